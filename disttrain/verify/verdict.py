"""Calibrated verdicts: a W-process run's distance from one process, judged against the run's own rounding noise.

Three runs enter a verdict: the W-process run, the one-process reference (reading each batch as the ranks do and
rounding their partial sums alike, twin.py), and the reference's rounding twin, which is mathematically the same
computation in another floating-point summation order (the ranks' parts reversed). For the loss curve and for the
parameters, three numbers:

- the *distance*: W processes vs the reference (relative: max|a - b| / max|b|, the worst tensor);
- the *noise*: the twin vs the reference, measured the same way: how far rounding alone moves this config, in
  this precision, over this many steps (in a chaotic phase of training that is far more than in a calm one);
- the *floor* (FLOOR, per dtype): the least a verdict allows, should the twin land unusually close; it never caps
  what a correct run may show.

Each quantity is judged against ``bound = max(C * noise, floor)``: within it, EQUIVALENT; beyond MARGIN times it,
NOT EQUIVALENT; in between, INCONCLUSIVE. One twin is one sample of the noise and can land far too close, so a run
beyond the first twin's bound is judged again with the larger of its noise and the second twin's (twin.py) before
it is called anything but EQUIVALENT. The run's verdict:

- NOT EQUIVALENT: a quantity is beyond MARGIN x its bound;
- INCONCLUSIVE: a quantity lies between its bound and MARGIN x it, or no quantity is quiet enough to show a known
  mistake (reduce=sum, the plain average on uneven slices, clipping before averaging, per-rank BatchNorm, one
  dropped all_reduce): each one's C x noise reaches SMALLEST_MISTAKE, the smallest distance such a mistake caused;
- EQUIVALENT: otherwise (every quantity within its bound, and at least one could have shown a mistake).

Without a twin (``noise`` None, ``verify --uncalibrated``) the fixed tolerances decide alone, with no margin, as verify
judged before twins: an uncalibrated check.

C, MARGIN, SMALLEST_MISTAKE and FLOOR are measured (tests/measure_verdicts.py, docs/verdicts.md). These functions
need no CLI and no process group: they compare state_dicts and loss curves that are already in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import EXIT_FAILED, EXIT_INCONCLUSIVE, EXIT_OK

EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE = "EQUIVALENT", "NOT EQUIVALENT", "INCONCLUSIVE"
# Measured over the table of docs/verdicts.md (python -m tests.measure_verdicts, 29 configs, 149 runs): correct runs
# reached at most 1.03 of the bound (4.1 x the larger twin's noise, a bf16 SyncBN CNN at W=4, INCONCLUSIVE) and 0.51
# of it otherwise; no correct run came near MARGIN x it.
C = 4.0  # a correct run lands within C x its twin's noise
MARGIN = 10.0  # NOT EQUIVALENT: beyond MARGIN x the bound; between the bound and that: INCONCLUSIVE
# The smallest distance from one device that a known mistake caused in a measured config, per quantity (comm.reduce=avg
# on B=31 over W=2, fp16 SyncBN CNN: loss 4.6e-4, parameters 1.6e-2): a quantity whose C x noise reaches it could
# hide such a mistake.
SMALLEST_MISTAKE = {"loss": 4.5e-4, "parameters": 1.5e-2}
# The floor per step of training, by dtype or autocast precision: the least a verdict allows, should a twin land
# unusually close to its reference. Whole-run verify: FLOOR; a step-wise segment of k steps: FLOOR * k.
# tf32 (float32 on CUDA with train.tf32: 10 mantissa bits in matmuls and convolutions): fp16's floor, not measured.
FLOOR = {"float64": 1e-10, "float32": 1e-6, "bf16": 3e-5, "fp16": 1e-5, "tf32": 1e-5}
# Exit codes of verify: 0 equivalent, 1 not equivalent (errors.EXIT_FAILED), 3 inconclusive (2 is a user error).
EXIT_CODES = {EQUIVALENT: EXIT_OK, NOT_EQUIVALENT: EXIT_FAILED, INCONCLUSIVE: EXIT_INCONCLUSIVE}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (0 when both are all zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def state_difference(state: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative difference per floating-point entry of two state_dicts with the same keys."""
    if state.keys() != ref_state.keys():
        raise ValueError(f"state_dicts differ in keys: {sorted(set(state) ^ set(ref_state))}")
    return {k: relative_difference(state[k], ref_state[k]) for k in ref_state if ref_state[k].is_floating_point()}


def curve_difference(losses: Sequence[float], ref_losses: Sequence[float], scale: float | None = None) -> float:
    """The largest difference of two loss curves relative to ``scale`` (default: the reference curve's largest
    magnitude; a per-step relative difference is ill-conditioned where a converging loss approaches zero)."""
    if len(losses) != len(ref_losses):
        raise ValueError(f"loss curves differ in length: {len(losses)} and {len(ref_losses)} steps")
    scale = max(max((abs(r) for r in ref_losses), default=0.0), 1e-300) if scale is None else scale
    return max((abs(a - b) for a, b in zip(losses, ref_losses)), default=0.0) / scale


@dataclass(frozen=True)
class Judgement:
    """One quantity ("loss" or "parameters") judged: distance, noise (None: no twin), floor, verdict."""

    quantity: str
    distance: float
    noise: float | None
    floor: float
    verdict: str  # of this quantity: EQUIVALENT (within the bound), NOT EQUIVALENT (beyond MARGIN x it), or
    # INCONCLUSIVE (in between)

    @property
    def bound(self) -> float:
        return self.floor if self.noise is None else max(C * self.noise, self.floor)

    @property
    def sensitive(self) -> bool:
        """True: a known mistake would stand out of this quantity's noise (no twin: assumed, as before twins)."""
        return self.noise is None or C * self.noise < SMALLEST_MISTAKE[self.quantity]

    @property
    def ratio(self) -> float:
        """distance / bound: <= 1 within it, > MARGIN not equivalent."""
        if self.bound > 0:
            return self.distance / self.bound
        return float("inf") if self.distance > 0 else 0.0


def judge(quantity: str, distance: float, noise: float | None, floor: float) -> Judgement:
    """One quantity's verdict. Without a twin (``noise`` None) the floor alone decides, with no margin: the
    uncalibrated check, as verify judged before twins."""
    bound = floor if noise is None else max(C * noise, floor)
    if distance <= bound:
        verdict = EQUIVALENT
    elif noise is None or distance > MARGIN * bound:
        verdict = NOT_EQUIVALENT
    else:
        verdict = INCONCLUSIVE
    return Judgement(quantity, distance, noise, floor, verdict)


def overall(judgements: Sequence[Judgement]) -> str:
    """NOT EQUIVALENT if any quantity is; INCONCLUSIVE if any lies between its bound and MARGIN x it, or if no
    quantity is quiet enough to show a known mistake (each one's C x noise reaches SMALLEST_MISTAKE); else
    EQUIVALENT."""
    verdicts = {j.verdict for j in judgements}
    if NOT_EQUIVALENT in verdicts:
        return NOT_EQUIVALENT
    if INCONCLUSIVE in verdicts or not any(j.sensitive for j in judgements):
        return INCONCLUSIVE
    return EQUIVALENT


def combine(verdicts: Iterable[str]) -> str:
    """The verdict of several parts (step-wise: the segments): NOT EQUIVALENT if any is, else INCONCLUSIVE if any
    is, else EQUIVALENT."""
    seen = set(verdicts)
    return next((v for v in (NOT_EQUIVALENT, INCONCLUSIVE) if v in seen), EQUIVALENT)


def inconclusive_line(judgements: Sequence[Judgement]) -> str:
    """Why a verdict is INCONCLUSIVE, in one line: the noise, and the smallest known mistake's size."""
    between = [j for j in judgements if j.verdict == INCONCLUSIVE]
    if between:
        j = max(between, key=lambda j: j.ratio)
        return (f"INCONCLUSIVE: the {j.quantity} differ by {j.distance:.2e}, {j.ratio:.3g}x the bound max({C:g} x "
                f"noise {j.noise:.2e}, floor {j.floor:.0e}): beyond what rounding explains, but not by the {MARGIN:g}x "
                "margin of a mistake")
    j = min(judgements, key=lambda j: C * (j.noise or 0.0) / SMALLEST_MISTAKE[j.quantity])
    return (f"INCONCLUSIVE: the run's own rounding noise is {j.noise:.2e} in the {j.quantity} (reference vs its "
            f"twin); {C:g} x that reaches {SMALLEST_MISTAKE[j.quantity]:.1e}, the smallest known mistake's size, so a "
            "mistake could hide in it (verify fewer steps, or step-wise with shorter segments)")


@dataclass(frozen=True)
class Comparison:
    """Two runs compared, calibrated by a twin: the loss curve, the parameters, and the verdict."""

    loss: Judgement
    params: Judgement
    worst_param: str
    verdict: str
    second_twin: bool = False  # the noise is the larger of two twins' (the run was beyond the first twin's bound)

    @property
    def wants_second_twin(self) -> bool:
        """True when the first twin's noise puts a quantity beyond its bound: before a run is called anything but
        EQUIVALENT, the second twin (twin.py) measures the noise again, and the larger of the two decides."""
        return not self.second_twin and any(j.noise is not None and j.distance > j.bound
                                            for j in (self.loss, self.params))


def noise(twin_state: dict[str, torch.Tensor], twin_losses: Sequence[float], ref_state: dict[str, torch.Tensor],
          ref_losses: Sequence[float], loss_scale: float | None = None) -> dict[str, float]:
    """A twin's distance from its reference, as a run's is measured: {"loss": ..., "parameters": ...}."""
    return {"loss": curve_difference(twin_losses, ref_losses, loss_scale),
            "parameters": max(state_difference(twin_state, ref_state).values(), default=0.0)}


def calibrated_noise(first: dict[str, float] | None, second: dict[str, float] | None = None
                     ) -> dict[str, float | None]:
    """Per quantity, the first twin's noise, or with the second twin's the larger of the two (one twin can land
    unusually close to the reference: a rounding that happens not to flip in half precision, sums that commute).
    No first twin: None (uncalibrated)."""
    if first is None:
        return {"loss": None, "parameters": None}
    return {q: first[q] if second is None else max(first[q], second[q]) for q in ("loss", "parameters")}


def judge_pair(loss_distance: float, param_distance: float, noises: dict[str, float | None], floor: float,
               worst_param: str = "", second_twin: bool = False) -> Comparison:
    """The loss and parameter judgements and their verdict, from distances and noises already measured."""
    loss = judge("loss", loss_distance, noises["loss"], floor)
    params = judge("parameters", param_distance, noises["parameters"], floor)
    return Comparison(loss=loss, params=params, worst_param=worst_param, verdict=overall([loss, params]),
                      second_twin=second_twin)


def compare(state: dict[str, torch.Tensor], losses: Sequence[float], ref_state: dict[str, torch.Tensor],
            ref_losses: Sequence[float], floor: float, twin_state: dict[str, torch.Tensor] | None = None,
            twin_losses: Sequence[float] | None = None, second_state: dict[str, torch.Tensor] | None = None,
            second_losses: Sequence[float] | None = None) -> Comparison:
    """Judge a run (``state``, ``losses``) against a reference, calibrated by the reference's twin (and by the larger
    of its noise and the second twin's, when that is given: twin.py).

    Without a twin the verdict is the floor's alone (an uncalibrated check). Usable outside the CLI: any two
    state_dicts with the same keys and loss curves of the same length.
    """
    diffs = state_difference(state, ref_state)
    worst = max(diffs, key=diffs.get) if diffs else ""
    first = None if twin_state is None else noise(twin_state, twin_losses, ref_state, ref_losses)
    second = None if second_state is None or first is None else noise(second_state, second_losses, ref_state,
                                                                       ref_losses)
    return judge_pair(curve_difference(losses, ref_losses), diffs[worst] if diffs else 0.0,
                      calibrated_noise(first, second), floor, worst, second is not None)


__all__ = ["EQUIVALENT", "NOT_EQUIVALENT", "INCONCLUSIVE", "C", "MARGIN", "SMALLEST_MISTAKE", "FLOOR", "EXIT_CODES",
           "Judgement", "Comparison", "judge", "judge_pair", "overall", "combine", "compare", "noise",
           "calibrated_noise", "relative_difference", "state_difference",
           "curve_difference", "inconclusive_line"]

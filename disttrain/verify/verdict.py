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
- INCONCLUSIVE: a quantity lies between its bound and MARGIN x it; or a twin's noise is beyond what rounding reaches
  in the dtype (CEILING: something else moves the runs apart, such as randomness disttrain does not key); or a known
  mistake that changes this run's numbers would not have been told apart from it: its *mistake twin* (the reference
  with the mistake emulated, mistakes.py) lies within the bound in both quantities;
- EQUIVALENT: otherwise (every quantity within its bound, and every mistake measured on this run beyond the bound of
  at least one quantity: that quantity decided).

Without a twin (``noise`` None, ``verify --uncalibrated``) the fixed tolerances decide alone, with no margin, as verify
judged before twins: an uncalibrated check.

C, MARGIN, FLOOR and CEILING are measured (tests/measure_verdicts.py, docs/verdicts.md). These functions
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
# The most rounding can carry a twin from its reference, by dtype (None: no ceiling). float64: 1e-6, about 1e10 unit
# roundoffs and 160x the most a correct run reached (6.1e-9, a chaotic MLP over a 100-step segment; 1.9e-10 over 300
# steps); a GPT-2 with unkeyed attention dropout measured 1.7e-1. float32 and half precision: none, chaotic training
# carries their rounding to order 1 (float32, 300 steps: 1.1), where no bound tells rounding from anything else.
CEILING = {"float64": 1e-6}
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
    # INCONCLUSIVE (in between, or the noise beyond the ceiling)
    ceiling: float | None = None  # the most rounding can reach in this dtype (CEILING; None: no ceiling)

    @property
    def not_rounding(self) -> bool:
        """True: the twin is further from the reference than rounding can carry it."""
        return self.noise is not None and self.ceiling is not None and self.noise > self.ceiling

    @property
    def bound(self) -> float:
        return self.floor if self.noise is None else max(C * self.noise, self.floor)

    @property
    def ratio(self) -> float:
        """distance / bound: <= 1 within it, > MARGIN not equivalent."""
        if self.bound > 0:
            return self.distance / self.bound
        return float("inf") if self.distance > 0 else 0.0


def judge(quantity: str, distance: float, noise: float | None, floor: float, ceiling: float | None = None
          ) -> Judgement:
    """One quantity's verdict. Without a twin (``noise`` None) the floor alone decides, with no margin: the
    uncalibrated check, as verify judged before twins. A noise beyond ``ceiling`` is not rounding: INCONCLUSIVE,
    whatever the distance (the bound is not widened to it)."""
    bound = floor if noise is None else max(C * noise, floor)
    if noise is not None and ceiling is not None and noise > ceiling:
        verdict = INCONCLUSIVE
    elif distance <= bound:
        verdict = EQUIVALENT
    elif noise is None or distance > MARGIN * bound:
        verdict = NOT_EQUIVALENT
    else:
        verdict = INCONCLUSIVE
    return Judgement(quantity, distance, noise, floor, verdict, ceiling)


@dataclass(frozen=True)
class Mistake:
    """A mistake twin measured (mistakes.py): how far the mistake moved the reference, per quantity; ``acted``
    False: it left this run's numbers unchanged (e.g. the plain average on an even split), nothing to tell apart."""

    name: str
    loss: float
    parameters: float
    acted: bool = True

    def told_apart_by(self, judgements: Sequence[Judgement]) -> list[str]:
        """The quantities in which this mistake lies beyond the bound (it would not have been called EQUIVALENT)."""
        return [j.quantity for j in judgements if getattr(self, j.quantity) > j.bound]


def overall(judgements: Sequence[Judgement], mistakes: Sequence[Mistake] | None = None) -> str:
    """NOT EQUIVALENT if any quantity is (the noise within its ceiling); INCONCLUSIVE if any lies between its bound
    and MARGIN x it or its noise is beyond the ceiling, or if a mistake twin that acted is within the bound of every
    quantity; else EQUIVALENT. ``mistakes`` None: the sensitivity was not measured (not required)."""
    verdicts = {j.verdict for j in judgements}
    if NOT_EQUIVALENT in verdicts and not any(j.not_rounding for j in judgements):
        return NOT_EQUIVALENT
    if verdicts - {EQUIVALENT}:
        return INCONCLUSIVE
    if any(m.acted and not m.told_apart_by(judgements) for m in mistakes or ()):
        return INCONCLUSIVE
    return EQUIVALENT


def decided_line(judgements: Sequence[Judgement], mistakes: Sequence[Mistake]) -> str:
    """Which quantity showed that the mistakes measured on this run would stand out, and why another was blind."""
    acted = [m for m in mistakes if m.acted]
    if not acted:
        return "sensitivity: no known weighting mistake changes this run's numbers"
    seeing = [j.quantity for j in judgements if all(j.quantity in m.told_apart_by(judgements) for m in acted)]
    blind = [(j, min(acted, key=lambda m: getattr(m, j.quantity) / j.bound)) for j in judgements
             if j.quantity not in seeing]
    names = ", ".join(m.name for m in acted)
    line = f"sensitivity: decided by {' and '.join(seeing) or 'neither quantity alone'} ({names} measured on this run)"
    for j, m in blind:
        are, them, their = ("is", "it", "its") if j.quantity == "loss" else ("are", "them", "their")
        line += (f"; the {j.quantity} {are} blind: {m.name} moves {them} by {getattr(m, j.quantity):.2e}, within "
                 f"{their} bound {j.bound:.2e}")
    return line


def combine(verdicts: Iterable[str]) -> str:
    """The verdict of several parts (step-wise: the segments): NOT EQUIVALENT if any is, else INCONCLUSIVE if any
    is, else EQUIVALENT."""
    seen = set(verdicts)
    return next((v for v in (NOT_EQUIVALENT, INCONCLUSIVE) if v in seen), EQUIVALENT)


def inconclusive_line(judgements: Sequence[Judgement], mistakes: Sequence[Mistake] | None = None) -> str:
    """Why a verdict is INCONCLUSIVE, in one line: noise that is not rounding, a distance between the bound and the
    margin, or a mistake this run would not have told apart."""
    loud = [j for j in judgements if j.not_rounding]
    if loud:
        j = max(loud, key=lambda j: j.noise / j.ceiling)
        return (f"INCONCLUSIVE: the twin is {j.noise:.2e} from the reference in the {j.quantity}, beyond the "
                f"{j.ceiling:.0e} that rounding reaches in this dtype: something other than summation order moves "
                "these runs apart (randomness from a process generator, a non-deterministic kernel), so no verdict")
    between = [j for j in judgements if j.verdict == INCONCLUSIVE]
    if between:
        j = max(between, key=lambda j: j.ratio)
        return (f"INCONCLUSIVE: the {j.quantity} differ by {j.distance:.2e}, {j.ratio:.3g}x the bound max({C:g} x "
                f"noise {j.noise:.2e}, floor {j.floor:.0e}): beyond what rounding explains, but not by the {MARGIN:g}x "
                "margin of a mistake")
    m = next(m for m in mistakes or () if m.acted and not m.told_apart_by(judgements))
    parts = ", ".join(f"{j.quantity} {getattr(m, j.quantity):.2e} within {j.bound:.2e}" for j in judgements)
    return (f"INCONCLUSIVE: the run's own rounding noise could hide {m.name}: on this run it moves the reference by "
            f"{parts} (the bounds, {C:g} x the twin's noise or the floor), so it would not have been told apart "
            "(verify fewer steps, or step-wise with shorter segments)")


@dataclass(frozen=True)
class Comparison:
    """Two runs compared, calibrated by a twin: the loss curve, the parameters, and the verdict."""

    loss: Judgement
    params: Judgement
    worst_param: str
    verdict: str
    second_twin: bool = False  # the noise is the larger of two twins' (the run was beyond the first twin's bound)
    mistakes: tuple[Mistake, ...] | None = None  # the mistake twins measured (None: not measured)

    @property
    def wants_mistakes(self) -> bool:
        """True when the run is within its bounds and calibrated but the mistake twins have not run: before it is
        called EQUIVALENT, they show whether this run could have told the known mistakes apart (mistakes.py)."""
        return (self.mistakes is None and self.verdict == EQUIVALENT
                and all(j.noise is not None for j in (self.loss, self.params)))

    @property
    def wants_second_twin(self) -> bool:
        """True when the first twin's noise puts a quantity beyond its bound: before a run is called anything but
        EQUIVALENT, the second twin (twin.py) measures the noise again, and the larger of the two decides."""
        return (not self.second_twin and not any(j.not_rounding for j in (self.loss, self.params))
                and any(j.noise is not None and j.distance > j.bound for j in (self.loss, self.params)))


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
               worst_param: str = "", second_twin: bool = False, ceiling: float | None = None,
               mistakes: Sequence[Mistake] | None = None) -> Comparison:
    """The loss and parameter judgements and their verdict, from distances, noises and mistakes already measured."""
    loss = judge("loss", loss_distance, noises["loss"], floor, ceiling)
    params = judge("parameters", param_distance, noises["parameters"], floor, ceiling)
    return Comparison(loss=loss, params=params, worst_param=worst_param, verdict=overall([loss, params], mistakes),
                      second_twin=second_twin, mistakes=None if mistakes is None else tuple(mistakes))


def compare(state: dict[str, torch.Tensor], losses: Sequence[float], ref_state: dict[str, torch.Tensor],
            ref_losses: Sequence[float], floor: float, twin_state: dict[str, torch.Tensor] | None = None,
            twin_losses: Sequence[float] | None = None, second_state: dict[str, torch.Tensor] | None = None,
            second_losses: Sequence[float] | None = None, ceiling: float | None = None,
            mistakes: Sequence[Mistake] | None = None) -> Comparison:
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
                      calibrated_noise(first, second), floor, worst, second is not None, ceiling, mistakes)


__all__ = ["EQUIVALENT", "NOT_EQUIVALENT", "INCONCLUSIVE", "C", "MARGIN", "CEILING", "FLOOR", "EXIT_CODES",
           "Judgement", "Mistake", "Comparison", "judge", "judge_pair", "overall", "combine", "compare", "noise",
           "decided_line",
           "calibrated_noise", "relative_difference", "state_difference",
           "curve_difference", "inconclusive_line"]

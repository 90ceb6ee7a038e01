"""Calibrated verdicts: a W-process run's distance from one process, judged against the run's own rounding noise.

Three runs enter a verdict: the W-process run, the one-process reference, and the reference's rounding twin
(twin.py), which is mathematically the same computation as the reference in another floating-point summation
order. For the loss curve and for the parameters, three numbers:

- the *distance*: W processes vs the reference (relative: max|a - b| / max|b|, the worst tensor);
- the *noise*: the twin vs the reference, measured the same way: how far rounding alone moves this config, in
  this precision, over this many steps (in a chaotic phase of training that is far more than in a calm one);
- the *floor*: the fixed tolerance of the dtype (whole.py RUN_TOLERANCE; step-wise: per (dtype, k)); it only
  guards against a twin that happened to land unusually close, it never caps what a correct run may show.

and a verdict, with ``bound = max(C * noise, floor)``:

- EQUIVALENT: distance <= bound;
- NOT EQUIVALENT: distance > bound (beyond C times the noise and beyond the floor);
- INCONCLUSIVE: distance <= bound, but C * noise reaches SMALLEST_MISTAKE, the smallest distance a known mistake
  was measured to cause (reduce=sum, the plain average on uneven slices, clipping before averaging, per-rank
  BatchNorm, one dropped all_reduce): such a mistake could hide in the noise.

C and SMALLEST_MISTAKE are measured (tests/measure_verdicts.py, docs/verdicts.md). These functions need no CLI
and no process group: they compare state_dicts and loss curves that are already in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE = "EQUIVALENT", "NOT EQUIVALENT", "INCONCLUSIVE"
# How far beyond the twin's noise a correct run may land. Measured over the table of docs/verdicts.md: correct
# runs reached at most 2.6x their twin's noise; broken runs that were not already beyond the floor were 30x and more.
C = 10.0
# The smallest distance from one device that a known mistake caused in any measured config (docs/verdicts.md).
SMALLEST_MISTAKE = 2e-2
# Exit codes of verify: 0 equivalent, 1 not equivalent (errors.EXIT_FAILED), 3 inconclusive (2 is a user error).
EXIT_CODES = {EQUIVALENT: 0, NOT_EQUIVALENT: 1, INCONCLUSIVE: 3}


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
    """One quantity (the loss curve or the parameters) judged: distance, noise (None: no twin), floor, verdict."""

    distance: float
    noise: float | None
    floor: float
    verdict: str

    @property
    def bound(self) -> float:
        return self.floor if self.noise is None else max(C * self.noise, self.floor)

    @property
    def margin(self) -> float:
        """bound / distance for a pass, distance / bound for a failure (inf: an exact match)."""
        if self.verdict == NOT_EQUIVALENT:
            return self.distance / self.bound
        return self.bound / self.distance if self.distance > 0 else float("inf")


def judge(distance: float, noise: float | None, floor: float) -> Judgement:
    """The verdict on one quantity (see the module docstring); ``noise`` None: the floor alone (no twin)."""
    bound = floor if noise is None else max(C * noise, floor)
    if distance > bound:
        verdict = NOT_EQUIVALENT
    elif noise is not None and C * noise >= SMALLEST_MISTAKE:
        verdict = INCONCLUSIVE
    else:
        verdict = EQUIVALENT
    return Judgement(distance, noise, floor, verdict)


def overall(judgements: Iterable[Judgement | str]) -> str:
    """NOT EQUIVALENT if any is, else INCONCLUSIVE if any is, else EQUIVALENT."""
    verdicts = {j if isinstance(j, str) else j.verdict for j in judgements}
    return next((v for v in (NOT_EQUIVALENT, INCONCLUSIVE) if v in verdicts), EQUIVALENT)


def inconclusive_line(noise: float) -> str:
    """Why a verdict is INCONCLUSIVE, in one line."""
    return (f"INCONCLUSIVE: the run's own rounding noise is {noise:.2e} (reference vs its twin); {C:g} x that reaches "
            f"{SMALLEST_MISTAKE:.0e}, the smallest known mistake's size, so a mistake could hide in it (verify fewer "
            "steps, or step-wise with shorter segments)")


@dataclass(frozen=True)
class Comparison:
    """Two runs compared, calibrated by a twin: the loss curve, the parameters, and the verdict."""

    loss: Judgement
    params: Judgement
    worst_param: str
    verdict: str


def compare(state: dict[str, torch.Tensor], losses: Sequence[float], ref_state: dict[str, torch.Tensor],
            ref_losses: Sequence[float], floor: float, twin_state: dict[str, torch.Tensor] | None = None,
            twin_losses: Sequence[float] | None = None) -> Comparison:
    """Judge a run (``state``, ``losses``) against a reference, calibrated by the reference's twin.

    Without a twin the verdict is the floor's alone (an uncalibrated check). Usable outside the CLI: any two
    state_dicts with the same keys and loss curves of the same length.
    """
    diffs = state_difference(state, ref_state)
    worst = max(diffs, key=diffs.get) if diffs else ""
    param_noise = loss_noise = None
    if twin_state is not None:
        param_noise = max(state_difference(twin_state, ref_state).values(), default=0.0)
    if twin_losses is not None:
        loss_noise = curve_difference(twin_losses, ref_losses)
    loss = judge(curve_difference(losses, ref_losses), loss_noise, floor)
    params = judge(diffs[worst] if diffs else 0.0, param_noise, floor)
    return Comparison(loss=loss, params=params, worst_param=worst, verdict=overall([loss, params]))


__all__ = ["EQUIVALENT", "NOT_EQUIVALENT", "INCONCLUSIVE", "C", "SMALLEST_MISTAKE", "EXIT_CODES", "Judgement",
           "Comparison", "judge", "overall", "compare", "relative_difference", "state_difference",
           "curve_difference", "inconclusive_line"]

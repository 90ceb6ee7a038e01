"""The report of step-wise verification (stepwise.py): every segment, the worst, the first failure, the verdict."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import Config
from .rows import shown_rows, with_gaps
from .verdict import C, EQUIVALENT, INCONCLUSIVE, NOT_EQUIVALENT, combine
from .whole import tolerance_key, unclaimed_reason

# The longest segments for which correct and broken runs stayed separated in every regime measured, and what
# rounding alone reached in a chaotic phase beyond them.
SEPARATED_UP_TO = {"float32": (10, "0.2 in 50 steps"), "float64": (50, "6e-9 in 100 steps"),
                   "bf16": (1, "5.3e-2 in 10 steps"), "fp16": (1, "3.9e-2 in 10 steps"),
                   "tf32": (1, "not measured; fp16's row, the same 10 mantissa bits")}


@dataclass
class Segment:
    start: int  # the checkpoint the reference starts from (0: the seeded initialisation)
    stop: int  # the checkpoint it is compared with
    world_size: int  # processes of the run that wrote checkpoint ``stop``
    param_rel_diff: float  # parameters and buffers
    worst_param: str
    loss_rel_diff: float  # the k losses, relative to the scale of the run's loss curve
    optimizer_rel_diff: float  # momentum / Adam moments (reported, not judged: see the module docstring)
    tolerance: float  # the floor of (dtype, k)
    passed: bool  # not NOT EQUIVALENT
    param_noise: float | None = None  # the segment's rounding twin vs the reference (None: no twin)
    loss_noise: float | None = None
    param_bound: float = 0.0  # max(C x noise, floor) of the parameters (0: the floor, no twin)
    loss_bound: float = 0.0  # and of the loss
    verdict: str = EQUIVALENT
    randomness: str = ""  # draws from a process generator in the reference (draws.describe): no verdict
    why: str = ""  # why the segment is INCONCLUSIVE (verdict.inconclusive_line)
    mistakes: int = 0  # mistake twins retrained for this segment (mistakes.py)
    hidden: str = ""  # a mistake this segment's bounds would not tell apart (its only reason to be INCONCLUSIVE)
    seen: tuple[str, ...] = ()  # the mistakes this segment told apart

    def __post_init__(self) -> None:
        self.param_bound = self.param_bound or self.tolerance  # no twin: the floor alone
        self.loss_bound = self.loss_bound or self.tolerance

    @property
    def ratio(self) -> float:
        """The larger distance / bound of the two quantities (> 1: over its bound)."""
        return max(self.param_rel_diff / self.param_bound, self.loss_rel_diff / self.loss_bound)

    @property
    def noise(self) -> float | None:
        return None if self.param_noise is None else max(self.param_noise, self.loss_noise or 0.0)

    @property
    def error(self) -> float:
        return max(self.param_rel_diff, self.loss_rel_diff)


@dataclass
class StepwiseReport:
    run_dir: str
    dtype: str  # the run's
    reference_dtype: str
    device: str
    segments: list[Segment]
    equivalent: bool
    margin: float  # min over segments of tolerance / error (inf when every segment is exact)
    worst: Segment | None  # the segment with the smallest margin
    first_failure: Segment | None  # the first segment over its tolerance
    steps: int  # optimizer steps retrained
    seconds: float
    jobs: int
    claimed: bool = True
    reason: str = ""
    note: str = ""  # segments longer than the measured separation holds for
    verdict: str = EQUIVALENT  # EQUIVALENT, NOT EQUIVALENT or INCONCLUSIVE (verdict.py)
    calibrated: bool = True  # False: no twins (--uncalibrated), the floors alone

    def to_json(self) -> str:
        summary = dataclasses.asdict(self)
        summary["margin"] = None if self.margin == float("inf") else self.margin  # JSON has no infinity
        return json.dumps(summary, indent=2)

    def table(self) -> str:
        lines = [f"{'segment':>17}  {'W':>3}  {'param diff':>10}  {'param noise':>11}  {'loss diff':>9}  "
                 f"{'loss noise':>10}  {'optim diff':>10}  {'floor':>7}  {'diff/bound':>10}"]
        shown = shown_rows([s.ratio for s in self.segments])  # many segments: the ends and the worst
        rows = []
        for s in (self.segments[i] for i in shown):
            noise = ["-" if n is None else f"{n:.2e}" for n in (s.param_noise, s.loss_noise)]
            mark = {EQUIVALENT: "", NOT_EQUIVALENT: "  FAIL", INCONCLUSIVE: "  INCONCLUSIVE"}[s.verdict]
            rows.append(f"{s.start:>8} ->{s.stop:>6}  {s.world_size:>3}  {s.param_rel_diff:>10.2e}  {noise[0]:>11}  "
                        f"{s.loss_rel_diff:>9.2e}  {noise[1]:>10}  {s.optimizer_rel_diff:>10.2e}  "
                        f"{s.tolerance:>7.0e}  {s.ratio:>10.3g}{mark}")
        lines += with_gaps(shown, len(self.segments), rows, "segment", "diff/bound")
        if not self.claimed:
            lines.append(f"note: {self.reason}")
        if self.note:
            lines.append(f"note: {self.note}")
        w = self.worst
        if w is not None:
            lines.append(f"worst segment: {_name(w)}: parameters {w.param_rel_diff:.3e} ({w.worst_param}), loss "
                         f"{w.loss_rel_diff:.3e}; bounds {w.param_bound:.3e}, {w.loss_bound:.3e} "
                         f"(margin {_margin(self.margin)})")
        f = self.first_failure
        lines.append("first segment over its bound: " + ("none" if f is None else
                     f"{_name(f)} (parameters {f.param_rel_diff:.3e}, loss {f.loss_rel_diff:.3e}: {f.ratio:.3g}x "
                     "its bound)"))
        noises = [s.noise for s in self.segments if s.noise is not None]
        lines.append("rounding noise (each segment's twin vs its reference): " +
                     (f"median {sorted(noises)[len(noises) // 2]:.3e}, max {max(noises):.3e}; bound max({C:g} x noise, "
                      "floor)" if noises else "not measured (--uncalibrated: the floors alone)"))
        lines.append(f"retrained {self.steps} steps in {len(self.segments)} segments in {self.seconds:.1f} s "
                     f"({self.reference_dtype} on {self.device}, {self.jobs} process{'es' if self.jobs > 1 else ''})")
        if self.verdict == INCONCLUSIVE and self.claimed:
            s = next(s for s in self.segments if s.verdict == INCONCLUSIVE)
            why = f"INCONCLUSIVE: {s.randomness}" if s.randomness else s.why or INCONCLUSIVE
            lines.append(f"verdict: {why} (first in {_name(s)})")
        else:
            lines.append(f"verdict: {self.verdict}: {'every' if self.equivalent else 'not every'} segment of the run "
                         f"in {self.run_dir} matches one process on the global batch (margin {_margin(self.margin)})"
                         + ("" if self.calibrated else " (uncalibrated: the fixed floors only, no rounding twins)"))
        return "\n".join(lines)


def _name(s: Segment) -> str:
    return f"steps {s.start} -> {s.stop}"


def _margin(margin: float) -> str:
    return "exact" if margin == float("inf") else f"{margin:.3g}x"


def settle_sensitivity(segments: list[Segment]) -> None:
    """A mistake one segment could not tell apart is still shown by the run where another segment tells it apart (the
    weighting mistakes act in every step): such a segment counts as EQUIVALENT."""
    seen = {m for s in segments for m in s.seen}
    for s in segments:
        if s.verdict == INCONCLUSIVE and s.hidden and s.hidden in seen:
            s.verdict, s.why = EQUIVALENT, ""


def summarize(cfg: Config, run_dir: Path, segments: list[Segment], reference_dtype: str, device: str,
              seconds: float, jobs: int, calibrated: bool = True) -> StepwiseReport:
    """The report: the worst segment (smallest bound / error), the first one over its bound, the verdict."""
    def margin(s: Segment) -> float:
        return 1.0 / s.ratio if s.ratio > 0 else float("inf")

    worst = min(segments, key=margin) if segments else None
    first = next((s for s in segments if not s.passed), None)
    reason = unclaimed_reason(cfg)
    kind = tolerance_key(cfg.train.dtype, cfg.train.precision, cfg.train.tf32)
    limit, measured = SEPARATED_UP_TO[kind]
    longest = max((s.stop - s.start for s in segments), default=0)
    note = (f"segments of up to {longest} {kind} steps: in a chaotic phase of training, rounding alone can "
            f"grow past the tolerance in segments of more than {limit} steps (measured: {measured}); checkpoint "
            f"every {limit} steps or fewer to separate correct from broken runs in every regime measured"
            if longest > limit and not calibrated else "")
    settle_sensitivity(segments)
    # Draws from a process generator leave no verdict at all, not even an unclaimed config's.
    verdict = (INCONCLUSIVE if any(s.randomness for s in segments) else NOT_EQUIVALENT if reason else
               combine(s.verdict for s in segments))
    return StepwiseReport(run_dir=str(run_dir), dtype=cfg.train.dtype, reference_dtype=reference_dtype,
                          device=device, segments=segments, equivalent=verdict == EQUIVALENT, verdict=verdict,
                          calibrated=calibrated,
                          margin=margin(worst) if worst else float("inf"), worst=worst, first_failure=first,
                          steps=sum(s.stop - s.start for s in segments), seconds=round(seconds, 3), jobs=jobs,
                          claimed=not reason, reason=reason, note=note)


__all__ = ["Segment", "StepwiseReport", "summarize", "settle_sensitivity", "SEPARATED_UP_TO"]

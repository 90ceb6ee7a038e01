"""The report of step-wise verification (stepwise.py): every segment, the worst, the first failure, the verdict."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import Config
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
    tolerance: float
    passed: bool

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

    def to_json(self) -> str:
        summary = dataclasses.asdict(self)
        summary["margin"] = None if self.margin == float("inf") else self.margin  # JSON has no infinity
        return json.dumps(summary, indent=2)

    def table(self) -> str:
        lines = [f"{'segment':>17}  {'W':>3}  {'param diff':>10}  {'loss diff':>9}  {'optim diff':>10}  "
                 f"{'tolerance':>9}"]
        for s in self.segments:
            lines.append(f"{s.start:>8} ->{s.stop:>6}  {s.world_size:>3}  {s.param_rel_diff:>10.2e}  "
                         f"{s.loss_rel_diff:>9.2e}  {s.optimizer_rel_diff:>10.2e}  {s.tolerance:>9.0e}"
                         f"{'' if s.passed else '  FAIL'}")
        if not self.claimed:
            lines.append(f"note: {self.reason}")
        if self.note:
            lines.append(f"note: {self.note}")
        w = self.worst
        if w is not None:
            lines.append(f"worst segment: {_name(w)}: parameters {w.param_rel_diff:.3e} ({w.worst_param}), loss "
                         f"{w.loss_rel_diff:.3e}, tolerance {w.tolerance:.0e} (margin {_margin(self.margin)})")
        f = self.first_failure
        lines.append("first segment over tolerance: " + ("none" if f is None else
                     f"{_name(f)} (parameters {f.param_rel_diff:.3e}, loss {f.loss_rel_diff:.3e}, "
                     f"tolerance {f.tolerance:.0e})"))
        lines.append(f"retrained {self.steps} steps in {len(self.segments)} segments in {self.seconds:.1f} s "
                     f"({self.reference_dtype} on {self.device}, {self.jobs} process{'es' if self.jobs > 1 else ''})")
        verdict = "EQUIVALENT" if self.equivalent else "NOT EQUIVALENT"
        lines.append(f"verdict: {verdict}: {'every' if self.equivalent else 'not every'} segment of the run in "
                     f"{self.run_dir} matches one process on the global batch (margin {_margin(self.margin)})")
        return "\n".join(lines)


def _name(s: Segment) -> str:
    return f"steps {s.start} -> {s.stop}"


def _margin(margin: float) -> str:
    return "exact" if margin == float("inf") else f"{margin:.3g}x"


def summarize(cfg: Config, run_dir: Path, segments: list[Segment], reference_dtype: str, device: str,
              seconds: float, jobs: int) -> StepwiseReport:
    """The report: the worst segment (smallest tolerance / error), the first one over tolerance, the verdict."""
    def margin(s: Segment) -> float:
        return s.tolerance / s.error if s.error > 0 else float("inf")

    worst = min(segments, key=margin) if segments else None
    first = next((s for s in segments if not s.passed), None)
    reason = unclaimed_reason(cfg)
    kind = tolerance_key(cfg.train.dtype, cfg.train.precision, cfg.train.tf32)
    limit, measured = SEPARATED_UP_TO[kind]
    longest = max((s.stop - s.start for s in segments), default=0)
    note = (f"segments of up to {longest} {kind} steps: in a chaotic phase of training, rounding alone can "
            f"grow past the tolerance in segments of more than {limit} steps (measured: {measured}); checkpoint "
            f"every {limit} steps or fewer to separate correct from broken runs in every regime measured"
            if longest > limit else "")
    return StepwiseReport(run_dir=str(run_dir), dtype=cfg.train.dtype, reference_dtype=reference_dtype,
                          device=device, segments=segments, equivalent=not reason and first is None,
                          margin=margin(worst) if worst else float("inf"), worst=worst, first_failure=first,
                          steps=sum(s.stop - s.start for s in segments), seconds=round(seconds, 3), jobs=jobs,
                          claimed=not reason, reason=reason, note=note)


__all__ = ["Segment", "StepwiseReport", "summarize", "SEPARATED_UP_TO"]

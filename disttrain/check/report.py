"""The check's report on one screen: data, replicas, distance per step, the cause hints, the verdict.

The verdict is verify's (verify/verdict.py): the largest parameter distance over the steps whose data matched,
judged against max(C x the twins' noise, the floor of the run's precision); float64 without a twin keeps the fixed
floor. A run whose ranks did not see the reference's global batch, or whose replicas parted, is NOT EQUIVALENT
whatever its distance: it is not the one-device run. Every hint is computed from the measurements.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..verify.verdict import (EQUIVALENT, EXIT_CODES, FLOOR, INCONCLUSIVE, NOT_EQUIVALENT, Judgement,
                              inconclusive_line, judge, overall)
from .compare import Measurements, Ratio, StepRow, first_beyond
from .records import Records

# An update is one multiple of the reference's when it leaves a residual, and its per-tensor scales spread, no more
# than this many times the bound (rounding's share): a sum or a double average is exact to rounding in every tensor.
UNIFORM = 100.0


@dataclass
class CheckReport:
    script: str
    nproc: int
    steps: int
    kind: str  # float64, float32, bf16, fp16: the floor's row
    rows: list[StepRow]
    data: str  # one line
    data_step: int | None
    replicas: str
    replica_step: int | None
    bound: float
    first_beyond: int | None
    worst_step: int
    hints: list[str]
    verdict: str
    verdict_line: str
    twins: int
    seconds: float = 0.0
    judgement: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_json(self) -> str:
        summary = dataclasses.asdict(self)
        summary["exit_code"] = self.exit_code
        return json.dumps(summary, indent=2)

    def table(self) -> str:
        twin = (f"noise from {self.twins} rounding twin{'s' if self.twins > 1 else ''} (each batch's samples "
                "permuted)" if self.twins else f"{self.kind}: the fixed floor, no twin")
        lines = [f"check: {self.script} at W={self.nproc} against 1 process, {self.steps} optimizer steps, "
                 f"{self.kind} ({self.seconds:.1f} s)",
                 f"data:     {self.data}", f"replicas: {self.replicas}",
                 f"distance: largest relative parameter difference from the reference per step (bound "
                 f"{self.bound:.1e}: {twin})"]
        for row in self.rows:
            noise = "" if row.noise is None else f"  noise {row.noise:.2e}"
            mark = "  <- beyond the bound" if row.step == self.first_beyond else ""
            lines.append(f"  step {row.step:>3}: {row.distance:.2e}  {row.worst}{noise}{mark}")
        if self.first_beyond is None:
            lines.append("  first step beyond the bound: none")
        lines += [f"cause:    {h}" for h in self.hints] or ["cause:    nothing to explain"]
        lines.append(f"verdict:  {self.verdict_line}")
        return "\n".join(lines)


def build_report(script: str, run: Records, ref: Records, twins: list[Records], m: Measurements,
                 seconds: float) -> CheckReport:
    steps = len(m.rows) - 1
    kind = ref.kind()
    floor = FLOOR[kind]
    judged = [r for r in m.rows[1:] if m.data.first_step is None or r.step < m.data.first_step]
    distance = max((r.distance for r in judged), default=0.0)
    noise = max((r.noise for r in judged), default=0.0) if twins else None
    j = judge("parameters", distance, noise, floor)
    worst = max(judged, key=lambda r: r.distance).step if judged else 0
    beyond = first_beyond(m.rows, j.bound)
    data, data_step = _data_line(m), m.data.first_step
    replica_step = m.replicas.first_step
    if replica_step is None:
        replicas = f"EQUAL: all {run.nproc} ranks hold bitwise the same parameters after every step"
    else:
        replicas = (f"DIFFER from step {replica_step}: rank {m.replicas.rank}'s {m.replicas.tensor} is "
                    f"{m.replicas.difference:.2e} from rank 0's (the ranks train different models)")
    verdict = overall([j]) if judged else NOT_EQUIVALENT
    if data_step is not None or replica_step is not None:
        verdict = NOT_EQUIVALENT
    hints = _hints(run, ref, m, j, beyond)
    line = _verdict_line(verdict, j, m, judged, run.nproc)
    return CheckReport(script=script, nproc=run.nproc, steps=steps, kind=kind, rows=m.rows, data=data,
                       data_step=data_step, replicas=replicas, replica_step=replica_step, bound=j.bound,
                       first_beyond=beyond.step if beyond else None, worst_step=worst, hints=hints, verdict=verdict,
                       verdict_line=line, twins=len(twins), seconds=round(seconds, 2),
                       judgement=dataclasses.asdict(j) | {"bound": j.bound})


def _data_line(m: Measurements) -> str:
    if not m.data.seen:
        return m.data.line
    if m.data.first_step is None:
        return ("EQUAL: at every step the ranks together saw the reference's global batch (the same samples, "
                "order free)")
    return f"DIFFER from step {m.data.first_step}: {m.data.line}; no verdict on the steps from there"


def _verdict_line(verdict: str, j: Judgement, m: Measurements, judged: list[StepRow], nproc: int) -> str:
    if m.data.first_step is not None:
        where = (f"; the steps before it are within {j.distance:.2e} (bound {j.bound:.1e})" if judged else "")
        return (f"{NOT_EQUIVALENT}: the {nproc} ranks did not train on the reference's global batches from step "
                f"{m.data.first_step}{where}")
    if m.replicas.first_step is not None:
        return f"{NOT_EQUIVALENT}: the ranks' replicas differ from step {m.replicas.first_step}"
    if verdict == INCONCLUSIVE:
        return inconclusive_line([j])
    if verdict == EQUIVALENT:
        return (f"{EQUIVALENT}: the W={nproc} run stays within {j.distance:.2e} of one process on the global batch "
                f"(bound {j.bound:.1e})")
    return (f"{NOT_EQUIVALENT}: the W={nproc} run is {j.distance:.2e} from one process on the global batch, "
            f"{j.ratio:.3g}x the bound {j.bound:.1e}")


def _hints(run: Records, ref: Records, m: Measurements, j: Judgement, beyond: StepRow | None) -> list[str]:
    """What the measurements point at, strongest evidence first; nothing when the run is on the reference."""
    w, hints = run.nproc, []
    if m.data.first_step is not None:
        hints.append(f"the data (above): from step {m.data.first_step} the ranks and the reference trained on other "
                     "batches; make them read the same ones before judging the arithmetic")
    groups = {meta.get("group_size", 0) for meta in run.metas}
    if groups != {w}:
        size = ", ".join(str(g) for g in sorted(groups))
        hints.append(f"no process group of {w} was started (group size {size}): the {w} ranks trained "
                     f"{w} independent copies" if groups == {0} else f"process group of size {size}, not {w}")
    if m.rows[0].distance > 0:
        hints.append(f"the initial parameters differ from the reference's by {m.rows[0].distance:.2e} "
                     f"({m.rows[0].worst}): seed the model the same way in both")
    draws = next((meta["draws"] for meta in run.metas if meta.get("draws")), "")
    dropout = run.modules("dropout")
    if draws and w > 1:
        hints.append(f"randomness per process (the first step, every rank's generator): {draws}")
    elif dropout and w > 1:
        hints.append("randomness per process: " + ", ".join(f"{n} x {c}" for c, n in dropout.items())
                     + " in training mode draw their masks from each rank's generator, not the one device's")
    batchnorm = run.modules("batchnorm")
    if batchnorm and w > 1:
        hints.append("BatchNorm not synchronised: " + ", ".join(f"{n} x {c}" for c, n in batchnorm.items())
                     + " normalise each rank's slice with its own statistics (SyncBatchNorm: the global batch's)")
    if m.not_updated:
        shown = ", ".join(m.not_updated[:3]) + (f" (+{len(m.not_updated) - 3})" if len(m.not_updated) > 3 else "")
        hints.append(f"parameters no rank updated (the reference did): {shown}")
    ratio = m.ratios.get(beyond.step) if beyond is not None else None
    apart = m.replicas.first_step is not None and m.replicas.first_step <= beyond.step if beyond else False
    if ratio is not None and ratio.scales and not apart and (m.data.first_step is None
                                                               or m.data.first_step > beyond.step):
        hints.append(_ratio_hint(ratio, beyond.step, w, run, max(UNIFORM * j.bound, 1e-8)))
    return hints


def _ratio_hint(ratio: Ratio, step: int, w: int, run: Records, tol: float) -> str:
    scales = list(ratio.scales.values())
    low, high = min(scales), max(scales)
    mid = sorted(scales)[len(scales) // 2]
    adaptive = any(name.startswith("Adam") or name in ("Adagrad", "RMSprop", "Adadelta")
                   for name in run.metas[0].get("optimizers", {}).values())
    note = " (an adaptive optimizer hides a uniform scale of the gradient in its first update)" if adaptive else ""
    update = "the first update" if step == 1 else f"step {step}'s update (from equal parameters)"
    if ratio.residual <= tol and high - low <= tol * abs(mid):
        if abs(mid - w) <= tol * w:
            return (f"{update} is x{mid:.3g} the reference's in every tensor (x{w} = W): the ranks' gradients "
                    "are summed where one process's is a mean (a sum over ranks without the 1/W)")
        if abs(mid - 1 / w) <= tol / w:
            return (f"{update} is x{mid:.3g} the reference's in every tensor (x1/{w}): the ranks divide by W "
                    "what one process does not (DDP's average of losses summed over samples, or a double average)")
        return f"{update} is x{mid:.3g} the reference's in every tensor: a uniform scale{note}"
    return (f"{update} is x{low:.3g} to x{high:.3g} the reference's per tensor (non-uniform, residual "
            f"{ratio.residual:.2g}): weights that depend on counts per rank or micro-batch (per-rank or "
            f"per-micro-batch means of uneven counts), randomness per process, or batch statistics per rank{note}")


__all__ = ["CheckReport", "build_report"]

"""The measurements of a check, step by step: the data the ranks saw against the reference's global batch, the
replicas against each other, the distance from the reference, the twins' distance (the rounding noise), and the
first update's ratio to the reference's per tensor (the cause hint's evidence).

Distances are verify's (verdict.relative_difference: max|a - b| / max|b| per tensor, the worst tensor).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..verify.verdict import state_difference
from .records import Records


@dataclass
class StepRow:
    step: int
    distance: float  # rank 0 vs the reference, the worst tensor
    worst: str
    noise: float | None = None  # the twins' largest distance from the reference (None: no twin)


@dataclass
class DataFinding:
    seen: bool  # the training forwards' inputs were fingerprinted
    first_step: int | None = None  # the first step whose union of ranks' samples is not the reference's batch
    line: str = ""


@dataclass
class Replicas:
    first_step: int | None = None  # the first step at which a rank's parameters differ from rank 0's
    rank: int = 0
    tensor: str = ""
    difference: float = 0.0


@dataclass
class Ratio:
    """One step's update (its parameters minus the step before's) of the ranks against the reference's, fitted per
    tensor. Meaningful at the first step beyond the bound: before it, both started from the same parameters."""

    scales: dict[str, float] = field(default_factory=dict)  # tensor -> <dW, dR> / <dR, dR>
    residual: float = 0.0  # the worst |dW - s dR| / |dW|: 0 when every tensor's update is a multiple of the reference's


@dataclass
class Measurements:
    rows: list[StepRow]
    data: DataFinding
    replicas: Replicas
    ratios: dict[int, Ratio]  # step -> its update's ratio
    not_updated: list[str]  # tensors the reference updated and no rank did
    names: dict[str, str]


def measure(run: Records, ref: Records, twins: list[Records], steps: int) -> Measurements:
    """Read the records step by step (0: the initial parameters) and measure."""
    names = ref.names() or run.names()
    name = lambda key: names.get(key, key)  # noqa: E731
    rows, replicas = [], Replicas()
    prev = prev_ref = None
    ratios: dict[int, Ratio] = {}
    run_changed: set[str] = set()
    ref_changed: set[str] = set()
    for step in range(steps + 1):
        state, ref_state = run.params(0, step), ref.params(0, step)
        diffs = state_difference(state, ref_state)
        worst = max(diffs, key=diffs.get)
        row = StepRow(step, diffs[worst], name(worst))
        if twins:
            row.noise = max(max(state_difference(t.params(0, step), ref_state).values()) for t in twins)
        rows.append(row)
        if replicas.first_step is None:
            for rank in range(1, run.nproc):
                other = state_difference(run.params(rank, step), state)
                bad = max(other, key=other.get)
                if other[bad] > 0:
                    replicas = Replicas(step, rank, name(bad), other[bad])
                    break
        if prev is not None:
            run_changed |= {k for k in state if not torch.equal(state[k], prev[k])}
            ref_changed |= {k for k in ref_state if not torch.equal(ref_state[k], prev_ref[k])}
            ratios[step] = _ratio(state, prev, ref_state, prev_ref, name)
        prev, prev_ref = state, ref_state
    not_updated = [name(k) for k in sorted(ref_changed - run_changed)]
    return Measurements(rows, _data(run, ref, steps), replicas, ratios, not_updated, names)


def _ratio(state: dict, start: dict, ref_state: dict, ref_start: dict, name) -> Ratio:
    ratio = Ratio()
    for key in ref_state:
        d_run, d_ref = state[key] - start[key], ref_state[key] - ref_start[key]
        ref_norm = float((d_ref * d_ref).sum())
        if ref_norm == 0.0:
            continue
        scale = float((d_run * d_ref).sum()) / ref_norm
        ratio.scales[name(key)] = scale
        run_norm = float(d_run.norm())
        if run_norm > 0:
            ratio.residual = max(ratio.residual, float((d_run - scale * d_ref).norm()) / run_norm)
    return ratio


def _data(run: Records, ref: Records, steps: int) -> DataFinding:
    """Whether the ranks together saw the reference's global batch at every step (a multiset: order free)."""
    ref_all: Counter = Counter()
    ref_steps = [Counter(ref.samples(0, k)) for k in range(1, steps + 1)]
    for batch in ref_steps:
        ref_all.update(batch)
    if not ref_all:
        return DataFinding(False, line="not seen: no training forward of a module took tensors (the check "
                                       "fingerprints the inputs of the outermost module call)")
    for k, expected in enumerate(ref_steps, start=1):
        per_rank = [Counter(run.samples(r, k)) for r in range(run.nproc)]
        union = sum(per_rank, Counter())
        if union == expected:
            continue
        sizes = "+".join(str(sum(c.values())) for c in per_rank)
        parts = [f"step {k}: the {run.nproc} ranks saw {sizes} = {sum(union.values())} samples, the reference "
                 f"{sum(expected.values())}"]
        if sum(union.values()) != sum(expected.values()):
            parts.append(f"the global batches differ in size (the reference's batch should be {run.nproc} x a "
                         "rank's: --reference-args)")
        shared = sum(1 for s in union if sum(1 for c in per_rank if s in c) > 1)
        if shared:
            parts.append(f"{shared} samples on more than one rank (a sampler that does not split the data, or "
                         "pads by repeating)")
        extra = union - expected
        repeated = sum(n for s, n in extra.items() if s in expected)
        if repeated and not shared:
            parts.append(f"{repeated} samples more often than in the reference's batch (repeated: padding)")
        elsewhere = sum(n for s, n in extra.items() if s not in expected and s in ref_all)
        if elsewhere:
            parts.append(f"{elsewhere} of the ranks' samples are in the reference's other batches (another order: "
                         "a shuffle per rank, or a sampler the reference does not use)")
        never = sum(n for s, n in extra.items() if s not in ref_all)
        if never:
            parts.append(f"{never} samples the reference never saw in {steps} steps")
        missing = sum((expected - union).values())
        if missing:
            parts.append(f"{missing} of the reference's samples on no rank")
        return DataFinding(True, k, "; ".join(parts))
    return DataFinding(True)


def first_beyond(rows: list[StepRow], bound: float) -> StepRow | None:
    return next((r for r in rows if r.step > 0 and r.distance > bound), None)


__all__ = ["StepRow", "DataFinding", "Replicas", "Ratio", "Measurements", "measure", "first_beyond"]

"""Step-wise verification: every checkpointed segment of a run, retrained by one process.

Whole-run verification (verify/whole.py) compares the end of a W-process run with the end of a one-process run. Training
amplifies rounding differences, so for long float32 runs the two ends drift apart although every step is right.
Step-wise verification removes the amplification: for each pair of consecutive checkpoints (s, s+k) of a run
(and the first segment, from the seeded initialisation), one process loads checkpoint s, trains the same k global
batches with the same code (train.run, world size 1), and compares the result with checkpoint s+k: parameters and
buffers, the optimizer state, and the k losses in metrics.jsonl. Each segment starts from the run's own state, so
its error depends on k and on the dtype, never on how long the run has been going: one tolerance per (dtype, k)
holds for any run length, and a mistake shows in the first segment it touches.

Calibrated verdicts (verdict.py, docs/verdicts.md): each segment is retrained twice, as the reference and as its
rounding twin (twin.py: both read the segment's batches as its ranks did, as many as its checkpoint's world size),
and judged against that noise with verdict.FLOOR * k as its floor; the tolerance table below is the uncalibrated
check (``twin=False``, and every ``--reference-dtype float64`` check of a float32 run, whose distance includes the
run's own float32 rounding).

What is compared, per segment, as in verify/whole.py: the largest relative difference max|a - b| / max|b| over the
floating-point tensors of the model state (parameters and buffers, e.g. SyncBN running statistics); the loss
difference of the k steps relative to the scale of the run's loss curve; and, reported alongside, the optimizer
state (momentum, Adam moments), whose relative differences are those of the *gradient*, ill-conditioned near a
minimum (a small net gradient carries the rounding of much larger per-sample terms), so it does not enter the
verdict. The reference runs in the run's dtype, or in float64 (``--reference-dtype float64``: the exact
arithmetic, so the difference is the run's own rounding); then the float32 run's inputs are float64 values
rounded, one more part of the float32 rounding that the tolerance covers.

Tolerances, from measurement (``python -m tests.measure_stepwise``: 2-core CPU, gloo, W = 2, 3, 4; a clipped MLP
at lr 0.3, chaotic until it fits the data; the same with weight decay 5e-3, chaotic throughout; a SyncBN CNN;
checkpoints after every step, segments of k steps; 1800 segments for k = 1, 180 for k = 10, 36 for 50, 18 for 100).
Broken: comm.reduce=sum, per-rank BatchNorm, clipping before averaging, rank 0 dropping one step's all_reduce,
each at the segment where the mistake first acts. The tolerance is BASE[dtype] * k:

    run/reference   k   correct: median    max     tolerance   smallest broken   tol/max correct   broken/tol
    float32/32      1            3.7e-08   1.2e-06   1e-04      2.2e-02             85x             220x
    float32/32     10            1.9e-07   1.3e-06   1e-03      1.6e-01            790x             160x
    float32/32     50            2.4e-06   4.5e-02   5e-03      2.2e-01            0.11x             44x
    float32/32    100            2.6e-05   8.2e-01   1e-02      2.3e-01            0.01x             23x
    float32/64      1            5.0e-08   9.6e-07   1e-04      2.2e-02            104x             220x
    float32/64     10            3.5e-07   5.8e-06   1e-03      1.6e-01            172x             160x
    float32/64     50            5.2e-06   2.0e-01   5e-03      2.2e-01            0.03x             44x
    float32/64    100            1.0e-04   9.8e-01   1e-02      2.3e-01            0.01x             23x
    float64/64      1            8.7e-17   2.3e-15   1e-10      2.2e-02          43000x             2e8x
    float64/64     10            4.1e-16   1.6e-15   1e-09      1.6e-01          6e+05x           1.6e8x
    float64/64     50            4.0e-15   1.1e-11   5e-09      2.2e-01            450x             4e7x
    float64/64    100            3.7e-14   6.1e-09   1e-08      2.3e-01            1.6x           2.3e7x

Per step, that is verify/whole.py's whole-run tolerance. The error of a segment grows with k, slowly in most of training
and by 1.1x to 1.3x per step in a chaotic phase (the first MLP's transient): float32 segments of more than 10
steps, and float64 segments of more than 50, can then grow past the tolerance from rounding alone (float32, 50
steps: up to 0.2, while the median stays at 5e-6), and the report says so. Up to those lengths correct and broken
runs are at least 85x apart on either side in every regime measured.

Mixed precision (train.precision bf16 / fp16, ``python -m tests.measure_precision``): the reference retrains in the
run's precision (float64 is not autocast, so ``--reference-dtype float64`` is refused), with BASE 3e-3 (bf16) and
1e-3 (fp16) per step. Segments of one step separate correct from broken runs in every regime measured (bf16: 5x
above the largest correct error, 11x below the smallest broken one; fp16: 10x, 34x); longer segments do not in a
chaotic phase, where each step's half-precision rounding (~2^-9 for bf16) grows like float32's does over 50 steps:
README "Mixed precision" has the table.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint.format import CheckpointError, checkpoint_at, checkpoint_dir, list_checkpoints, load_checkpoint
from ..config.schema import Config
from ..config.parse import config_from_dict
from ..parallel.env import DistEnv, resolve_device
from ..errors import ConfigError
from ..config.identity import continuation_keys, trajectory_differences
from ..observe.runlog import read_metrics
from ..run.train import run
from .report import Segment, StepwiseReport, summarize
from .drawhook import RecordDraws
from .draws import describe
from .mistakes import AsMistake, applicable
from .twin import RANK_ORDER, SAMPLE_ORDER, AsRanks
from .verdict import (CEILING, FLOOR, INCONCLUSIVE, NOT_EQUIVALENT, Mistake, calibrated_noise, curve_difference,
                      inconclusive_line, judge_pair, noise)
from .whole import precision_name, relative_difference, state_difference, tolerance, tolerance_key

# --------------------------------------------------------------------------- the run's segments

def plan_segments(cfg: Config, run_dir: Path) -> list[tuple[int, int]]:
    """The segments (s, s+k) of the run in ``run_dir``, after checking that every one can be verified.

    Every user error is a ConfigError with one line: no checkpoints, a gap between checkpoints, an unreadable
    checkpoint, a checkpoint trained with another config, missing metrics.
    """
    where = f"--against {run_dir}"
    if not run_dir.is_dir():
        raise ConfigError(f"{where}: no such directory")
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{where}: no checkpoints in {checkpoint_dir(run_dir)}: step-wise verification needs a run "
                          "trained with train.checkpoint_every > 0 and train.keep_checkpoints: 0 (keep them all)")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{where}: no metrics.jsonl there")
    segments, previous = [], 0
    for step, path in found:
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            raise ConfigError(f"--against: {exc}") from None
        if state["step"] != step:
            raise ConfigError(f"--against: {path}: holds step {state['step']}, not {step}")
        differ = trajectory_differences(cfg.to_dict(), state["config"], continuation_keys(cfg))
        if differ:
            raise ConfigError(f"{where}: {path.name} was trained with a different config ({', '.join(differ)} "
                              "differ)")
        if step > cfg.train.steps:
            raise ConfigError(f"{where}: the run has a checkpoint at step {step}, beyond train.steps="
                              f"{cfg.train.steps}")
        written = state["config"]["train"]
        if step - previous > written["checkpoint_every"]:
            pruned = (f"train.keep_checkpoints={written['keep_checkpoints']} deleted the older ones"
                      if written["keep_checkpoints"] else "a checkpoint file is missing")
            raise ConfigError(f"{where}: no checkpoint between steps {previous} and {step} (written every "
                              f"{written['checkpoint_every']} steps): {pruned}; step-wise verification needs "
                              "every checkpoint (train.keep_checkpoints: 0)")
        segments.append((previous, step))
        previous = step
    logged = {m["step"] for m in read_metrics(run_dir)}
    missing = sorted(set(range(previous)) - logged)
    if missing:
        raise ConfigError(f"{where}: metrics.jsonl has no record of step {missing[0]}")
    return segments


# --------------------------------------------------------------------------- one segment

def _reference_config(cfg: Config, out_dir: str, dtype: str, device: str) -> Config:
    train = dataclasses.replace(cfg.train, out_dir=out_dir, checkpoint_every=0, dtype=dtype, device=device)
    return dataclasses.replace(cfg, train=train)


def _optimizer_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    """Largest relative difference over the floating-point tensors of two optimizer states."""
    worst = 0.0
    for index, entry in theirs["state"].items():
        for name, value in entry.items():
            mine = ours["state"].get(index, {}).get(name)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and isinstance(mine, torch.Tensor):
                worst = max(worst, relative_difference(mine, value))
    return worst


def check_segment(cfg: Config, run_dir: Path, start: int, stop: int, losses: dict[int, float], loss_scale: float,
                  reference_dtype: str, env: DistEnv, scratch: Path, twin: bool = True,
                  seen: set[str] | None = None) -> Segment:
    """Retrain steps [start, stop) in this process from checkpoint ``start`` and compare with checkpoint ``stop``;
    ``twin``: retrain them once more as the rounding twin (twin.py), whose distance calibrates the verdict (and once
    more as the second twin where the segment is beyond the first one's bound). ``seen``: the mistakes an earlier
    segment told apart (their twins need not run again: the run would have shown them there); grows here."""
    target = load_checkpoint(checkpoint_at(run_dir, stop))
    ranks = int(target["world_size"])  # the segment was trained by as many ranks as its closing checkpoint records
    draws = RecordDraws(steps=1)  # the segment's first step (recording slows a step 2-3x: drawhook.py)
    result = _retrain(cfg, run_dir, start, stop, reference_dtype, env, scratch / "reference", ranks, hooks=(draws,))
    ours = _cpu(result.model.state_dict())
    diffs = state_difference(target["model"], ours)
    worst = max(diffs, key=diffs.get)
    loss = curve_difference([losses[start + i] for i in range(len(result.losses))], result.losses, loss_scale)
    optim = _optimizer_difference(_cpu_state(result.optimizer.state_dict()), target["optimizer"])
    floor = segment_floor(cfg, stop - start, twin)
    common = dict(start=start, stop=stop, world_size=ranks, param_rel_diff=diffs[worst], worst_param=worst,
                  loss_rel_diff=loss, optimizer_rel_diff=optim, tolerance=floor)
    if draws.draws:  # the twins would measure the draws, not rounding: no verdict on this segment
        return Segment(**common, passed=True, verdict=INCONCLUSIVE, randomness=describe(draws.draws))

    def twin_noise(kind: str | None, hook: AsMistake | None = None) -> dict[str, float]:
        other = _retrain(cfg, run_dir, start, stop, reference_dtype, env, scratch / "twin", ranks, kind,
                         () if hook is None else (hook,))
        return noise(_cpu(other.model.state_dict()), other.losses, ours, result.losses, loss_scale)

    first = twin_noise(RANK_ORDER) if twin else None
    ceiling = CEILING.get(tolerance_key(cfg.train.dtype, cfg.train.precision, cfg.train.tf32)) if twin else None
    judged = judge_pair(loss, diffs[worst], calibrated_noise(first), floor, worst, ceiling=ceiling)
    noises = calibrated_noise(first)
    if judged.wants_second_twin:  # beyond the first twin's bound: the second twin's noise too, the larger decides
        noises = calibrated_noise(first, twin_noise(SAMPLE_ORDER))
        judged = judge_pair(loss, diffs[worst], noises, floor, worst, True, ceiling)
    if judged.wants_mistakes:  # within the bounds: would this segment have shown the known weighting mistakes?
        mistakes, seen = [], set() if seen is None else seen
        for name in (m for m in applicable(cfg, ranks) if m not in seen):
            hook = AsMistake(name, ranks)
            moved = twin_noise(None, hook)
            mistakes.append(Mistake(name, moved["loss"], moved["parameters"], hook.acted))
            if hook.acted and moved["loss"] <= judged.loss.bound and moved["parameters"] <= judged.params.bound:
                break
            seen.add(name)
        judged = judge_pair(loss, diffs[worst], noises, floor, worst, judged.second_twin, ceiling, mistakes)
    hidden = next((m.name for m in judged.mistakes or () if m.acted and not m.told_apart_by([judged.loss,
                                                                                              judged.params])), "")
    why = inconclusive_line([judged.loss, judged.params], judged.mistakes) if judged.verdict == INCONCLUSIVE else ""
    told = tuple(m.name for m in judged.mistakes or () if m.acted and m.told_apart_by([judged.loss, judged.params]))
    return Segment(**common, passed=judged.verdict != NOT_EQUIVALENT, why=why, hidden=hidden, seen=told,
                   mistakes=len(judged.mistakes or ()), param_noise=judged.params.noise,
                   loss_noise=judged.loss.noise, param_bound=judged.params.bound, loss_bound=judged.loss.bound,
                   verdict=judged.verdict)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def segment_floor(cfg: Config, k: int, twin: bool) -> float:
    """The floor of a k-step segment: verdict.FLOOR per step with a twin; without one, the fixed tolerance of the
    table above (the uncalibrated check)."""
    if twin:
        return FLOOR[tolerance_key(cfg.train.dtype, cfg.train.precision, cfg.train.tf32)] * k
    return tolerance(cfg.train.dtype, k, cfg.train.precision, cfg.train.tf32)


def _retrain(cfg: Config, run_dir: Path, start: int, stop: int, reference_dtype: str, env: DistEnv, scratch: Path,
             ranks: int, twin: str | None = None, hooks: tuple = ()):
    """Steps [start, stop) trained by this process from checkpoint ``start``, read as ``ranks`` ranks read them
    (twin.py): the reference, or a rounding twin (``twin``: twin.RANK_ORDER or twin.SAMPLE_ORDER)."""
    ref_cfg = _reference_config(cfg, str(scratch), reference_dtype, str(env.device.type))
    (scratch / "metrics.jsonl").unlink(missing_ok=True)  # run() would reread the previous segments' records
    resume = checkpoint_at(run_dir, start) if start > 0 else False
    # A float64 reference continues a float32 checkpoint: load_state_dict widens every tensor exactly.
    allow = frozenset({"train.dtype"}) if reference_dtype != cfg.train.dtype else frozenset()
    return run(ref_cfg, env, console=False, resume=resume, stop_at=stop, allow=allow,
               hooks=(AsRanks(ranks, twin), *hooks))


def _cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    return {"state": {i: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                      for i, entry in state["state"].items()}}


def reference_env(device: str) -> DistEnv:
    """One process, no process group: the reference sees every global batch whole."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # SyncBatchNorm would take its statistics over that group instead of the global batch.
        raise RuntimeError("the step-wise reference must run in a process without a multi-rank process group")
    return DistEnv(rank=0, local_rank=0, world_size=1, device=resolve_device(device, 0), backend=None)


def check_segments(cfg: Config, run_dir: Path, segments: list[tuple[int, int]], reference_dtype: str,
                   device: str = "cpu", twin: bool = True) -> list[Segment]:
    """Retrain and compare ``segments`` in this process, in order."""
    env = reference_env(device)
    records = read_metrics(run_dir)
    losses = {m["step"]: m["loss"] for m in records}
    # Like verify/whole.py, the loss is compared relative to the scale of its curve: a per-step relative difference is
    # ill-conditioned where a converging loss approaches zero.
    loss_scale = max(max((abs(m["loss"]) for m in records), default=0.0), 1e-300)
    seen: set[str] = set()  # mistakes told apart by an earlier segment: a run shows a mistake in any segment it acts in
    with tempfile.TemporaryDirectory(prefix="disttrain-stepwise-") as scratch:
        return [check_segment(cfg, run_dir, a, b, losses, loss_scale, reference_dtype, env, Path(scratch), twin, seen)
                for a, b in segments]


def _check_chunk(cfg_dict: dict, run_dir: str, segments: list[tuple[int, int]], reference_dtype: str, device: str,
                 threads: int, twin: bool) -> list[Segment]:
    torch.set_num_threads(threads)  # the jobs share the machine's cores
    return check_segments(config_from_dict(cfg_dict), Path(run_dir), segments, reference_dtype, device, twin)


def _chunks(segments: list[tuple[int, int]], jobs: int) -> list[list[tuple[int, int]]]:
    """Contiguous chunks with about the same number of steps each (the cost of a segment is its length)."""
    total = sum(b - a for a, b in segments)
    chunks: list[list[tuple[int, int]]] = [[] for _ in range(jobs)]
    done = 0
    for a, b in segments:
        chunks[min(jobs - 1, done * jobs // max(total, 1))].append((a, b))
        done += b - a
    return [c for c in chunks if c]


def verify_stepwise(cfg: Config, run_dir: Path, reference_dtype: str | None = None, device: str = "cpu",
                    jobs: int = 1, announce: Callable[[str], None] | None = None, twin: bool = True) -> StepwiseReport:
    """Verify every segment between consecutive checkpoints of the run in ``run_dir`` (see the module docstring).

    ``reference_dtype``: the reference's dtype (default: the run's). ``jobs`` > 1: segments are checked in that
    many local processes at once (each retrains its share; the result does not depend on ``jobs``).
    ``announce``: called with one line saying what will be retrained, once the run has been checked.
    ``twin``: retrain each segment a second time as the rounding twin and judge it against that noise (False: the
    per-(dtype, k) floor alone, an uncalibrated check at half the cost).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    try:
        resolve_device(device, 0)
    except (RuntimeError, ConfigError) as exc:
        raise ConfigError(f"reference device: {exc}") from None
    run_dir = Path(run_dir)
    reference_dtype = reference_dtype or cfg.train.dtype
    if reference_dtype != cfg.train.dtype and cfg.train.precision != "fp32":
        raise ConfigError(f"--reference-dtype {reference_dtype}: a train.precision={cfg.train.precision} run is "
                          f"retrained in its own precision ({cfg.train.dtype} weights); autocast leaves float64 alone")
    segments = plan_segments(cfg, run_dir)
    chunks = _chunks(segments, jobs)
    # A twin calibrates a reference in the run's own dtype: a float64 reference of a float32 run differs from the run
    # by the run's float32 rounding, which a float64 twin does not have. That check keeps the fixed tolerances.
    twin = twin and reference_dtype == cfg.train.dtype
    if announce is not None:
        announce(f"verify: {len(segments)} segments ({segments[-1][1]} steps) of the run in {run_dir}, each "
                 f"retrained by 1 process ({precision_name(cfg.train.dtype, cfg.train.precision)} run, "
                 f"{reference_dtype} reference on {device}, {'and its rounding twin, ' if twin else ''}"
                 f"{len(chunks)} job{'s' if len(chunks) > 1 else ''})")
    started = time.perf_counter()
    if len(chunks) == 1:
        results = check_segments(cfg, run_dir, segments, reference_dtype, device, twin)
    else:
        threads = max(1, (os.cpu_count() or 1) // len(chunks))
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited process group or threads
        with concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=context) as pool:
            futures = [pool.submit(_check_chunk, cfg.to_dict(), str(run_dir), c, reference_dtype, device, threads,
                                   twin) for c in chunks]
            results = [s for f in futures for s in f.result()]
    return summarize(cfg, run_dir, results, reference_dtype, device, time.perf_counter() - started, len(chunks), twin)

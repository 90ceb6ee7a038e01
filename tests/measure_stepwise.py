"""Measure the per-segment errors behind disttrain.stepwise's tolerances (a script that prints numbers).

    python -m tests.measure_stepwise [--quick] [--steps 200] [--out runs/stepwise-measure]

Correct runs (W = 2, 3, 4; float32 and float64; an MLP at the edge of stability and a SyncBN CNN) and broken ones
(comm.reduce=sum, per-rank BatchNorm, clipping before averaging, a rank that drops one step's all_reduce) are
trained once each with a checkpoint after every step, and their segments of k = 1, 10, 50, 100 steps are retrained by
one process in the run's dtype and in float64. Prints the distribution of correct errors, the smallest error a
broken run shows where it first goes wrong, and the margins to the tolerance formula. ``--quick`` measures
fewer runs (W=2, two models, 50 steps, k up to 50): the same table, from less data.

Interrupted (Ctrl-C, SIGTERM), it closes its worker pools before it exits, so that no process or semaphore
of theirs outlives it.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from disttrain.config import load_config
from disttrain.verify.stepwise import check_segments, tolerance
from tests.harness import WorkerPool
from tests.stepwise_runs import train_run

MLP = ["model.name=mlp", "model.hidden=16", "optim.lr=0.3", "clip.mode=norm", "clip.max_norm=1.0"]
MODELS = {
    # Clipped SGD at lr 0.3: chaotic until it fits the data, the regime where float32 differences grow fastest.
    "mlp": MLP,
    # The same with weight decay 5e-3: it never quite fits (loss ~1e-2) and stays chaotic (tests/test_stepwise.py).
    "mlp-wd": [*MLP, "optim.weight_decay=0.005"],
    "syncbn": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "train.global_batch_size=30",
               "clip.mode=norm", "clip.max_norm=1.0"],
}
BROKEN = {
    "reduce=sum": (["comm.reduce=sum"], None),
    "per-rank bn": (["model.norm=bn"], None),
    # max_norm below every rank's gradient norm at step 0, so that the mistake acts from the first step.
    "clip before average": (["clip.before_average=true", "comm.impl=allreduce", "clip.max_norm=0.1"], None),
    "dropped all_reduce": (["comm.impl=allreduce"], (0, 23)),
}
KS = (1, 10, 50, 100)
# What is measured: steps per run, world sizes of correct and of broken runs, models, segment lengths k.
FULL = {"steps": 200, "world_sizes": (2, 3, 4), "broken_world_sizes": (2, 4), "models": tuple(MODELS), "ks": KS}
QUICK = {"steps": 50, "world_sizes": (2,), "broken_world_sizes": (2,), "models": ("mlp", "syncbn"), "ks": (1, 10, 50)}


def _train(pools: dict[int, WorkerPool], world_size: int, overrides: list[str], out: Path, steps: int,
           skip: tuple[int, int] | None = None) -> Path:
    cfg = load_config(None, [*overrides, f"train.steps={steps}", "train.checkpoint_every=1",
                             "train.keep_checkpoints=0", "train.device=cpu", f"train.out_dir={out}"])
    if world_size not in pools:
        pools[world_size] = WorkerPool(world_size, timeout=600)
    pools[world_size].run(train_run, cfg.to_dict(), skip=skip)
    return out


def _errors(overrides: list[str], out: Path, steps: int, k: int, reference_dtype: str) -> list[float]:
    cfg = load_config(None, [*overrides, f"train.steps={steps}", "train.device=cpu"])
    segments = [(s, s + k) for s in range(0, steps - k + 1, k)]
    return [max(s.param_rel_diff, s.loss_rel_diff) for s in check_segments(cfg, out, segments, reference_dtype)]


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="python -m tests.measure_stepwise", description=__doc__.splitlines()[0])
    result.add_argument("--quick", action="store_true", help="fewer runs: W=2, two models, 50 steps, k <= 50")
    result.add_argument("--steps", type=int, default=None, help="steps per run (default 200, --quick 50)")
    result.add_argument("--out", type=Path, default=Path("runs/stepwise-measure"))
    return result


def main() -> None:
    args = parser().parse_args()
    plan = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        plan["steps"] = args.steps
    steps = plan["steps"]
    plan["ks"] = tuple(k for k in plan["ks"] if k <= steps)  # a segment longer than the run has no data
    # SIGTERM (a timeout, a closed session) ends the script like Ctrl-C: through the finally below, which
    # closes the pools; killed without it, their queues' named semaphores would be left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    torch.set_num_threads(1)
    pools: dict[int, WorkerPool] = {}
    correct: dict[tuple[str, str, int], list[float]] = {}  # (run dtype, reference dtype, k) -> errors
    broken: dict[tuple[str, str, int], list[tuple[float, str]]] = {}  # -> (first failing error, what)
    started = time.perf_counter()
    try:
        for dtype in ("float64", "float32"):
            refs = (dtype,) if dtype == "float64" else ("float32", "float64")
            for model in plan["models"]:
                base = [*MODELS[model], f"train.dtype={dtype}"]
                for world_size in plan["world_sizes"]:
                    out = _train(pools, world_size, base, args.out / f"{dtype}-{model}-w{world_size}", steps)
                    for ref in refs:
                        for k in plan["ks"]:
                            errs = _errors(base, out, steps, k, ref)
                            correct.setdefault((dtype, ref, k), []).extend(errs)
                            print(f"correct {dtype}/{ref} {model} W={world_size} k={k}: max {max(errs):.2e} "
                                  f"median {statistics.median(errs):.2e}", flush=True)
                for name, (extra, skip) in BROKEN.items():
                    if skip is not None and skip[1] >= steps:
                        continue  # the run ends before the step whose all_reduce would be dropped
                    for world_size in plan["broken_world_sizes"]:
                        cfg = [*base, *extra]
                        tag = f"{dtype}-{model}-w{world_size}-{name.replace(' ', '_').replace('=', '-')}"
                        out = _train(pools, world_size, cfg, args.out / tag, steps, skip)
                        for ref in refs:
                            for k in plan["ks"]:
                                errs = _errors(cfg, out, steps, k, ref)
                                # Where the mistake first acts: step 0, or the step whose all_reduce was dropped.
                                first = errs[0] if skip is None else errs[skip[1] // k]
                                broken.setdefault((dtype, ref, k), []).append(
                                    (first, f"{name}, {model}, W={world_size}"))
                                print(f"broken {name} {dtype}/{ref} {model} W={world_size} k={k}: first segment "
                                      f"{errs[0]:.2e} where it acts {first:.2e} min {min(errs):.2e}", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    print(f"\nmeasured in {time.perf_counter() - started:.0f} s\n")
    print("| run / reference dtype | k | correct segments | median | max | tolerance | smallest broken (first "
          "failing segment) | tolerance / max correct | smallest broken / tolerance |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(correct, key=lambda key: (key[0], key[1], key[2])):
        dtype, ref, k = key
        errs = correct[key]
        tol = tolerance(dtype, k)
        low, what = min(broken[key])
        print(f"| {dtype} / {ref} | {k} | {len(errs)} | {statistics.median(errs):.1e} | {max(errs):.1e} | "
              f"{tol:.0e} | {low:.1e} ({what}) | {tol / max(errs):.0f}x | {low / tol:.0f}x |")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the pools are closed (main's finally): one line, no traceback
        print("measure_stepwise: interrupted", file=sys.stderr)
        sys.exit(130)

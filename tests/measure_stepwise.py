"""Measure the per-segment errors behind disttrain.stepwise's tolerances (a script that prints numbers).

    python -m tests.measure_stepwise [--steps 200] [--out runs/stepwise-measure]

Correct runs (W = 2, 3, 4; float32 and float64; an MLP at the edge of stability and a SyncBN CNN) and broken ones
(comm.reduce=sum, per-rank BatchNorm, clipping before averaging, a rank that drops one step's all_reduce) are
trained once each with a checkpoint after every step, and their segments of k = 1, 10, 50, 100 steps are retrained by
one process in the run's dtype and in float64. Prints the distribution of correct errors, the smallest error a
broken run shows where it first goes wrong, and the margins to the tolerance formula.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from disttrain.config import load_config
from disttrain.stepwise import check_segments, tolerance
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
    result.add_argument("--steps", type=int, default=200)
    result.add_argument("--out", type=Path, default=Path("runs/stepwise-measure"))
    return result


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(1)
    pools: dict[int, WorkerPool] = {}
    correct: dict[tuple[str, str, int], list[float]] = {}  # (run dtype, reference dtype, k) -> errors
    broken: dict[tuple[str, str, int], list[tuple[float, str]]] = {}  # -> (first failing error, what)
    started = time.perf_counter()
    try:
        for dtype in ("float64", "float32"):
            refs = (dtype,) if dtype == "float64" else ("float32", "float64")
            for model, overrides in MODELS.items():
                base = [*overrides, f"train.dtype={dtype}"]
                for world_size in (2, 3, 4):
                    out = _train(pools, world_size, base, args.out / f"{dtype}-{model}-w{world_size}", args.steps)
                    for ref in refs:
                        for k in KS:
                            errs = _errors(base, out, args.steps, k, ref)
                            correct.setdefault((dtype, ref, k), []).extend(errs)
                            print(f"correct {dtype}/{ref} {model} W={world_size} k={k}: max {max(errs):.2e} "
                                  f"median {statistics.median(errs):.2e}", flush=True)
                for name, (extra, skip) in BROKEN.items():
                    for world_size in (2, 4):
                        cfg = [*base, *extra]
                        tag = f"{dtype}-{model}-w{world_size}-{name.replace(' ', '_').replace('=', '-')}"
                        out = _train(pools, world_size, cfg, args.out / tag, args.steps, skip)
                        for ref in refs:
                            for k in KS:
                                errs = _errors(cfg, out, args.steps, k, ref)
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
    main()

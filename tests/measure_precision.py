"""Measure the per-segment errors behind the bf16 and fp16 tolerances of disttrain.verify (prints numbers).

    python -m tests.measure_precision [--steps 60] [--out runs/precision-measure] [--models mlp syncbn]
        [--world-sizes 2 3 4] [--precisions bf16 fp16]

The method of tests/measure_stepwise.py, per precision: correct runs (W = 2, 3, 4, the global batch B = 31 split
unevenly; the three models of measure_stepwise) and broken ones (comm.reduce=sum, per-rank BatchNorm, clipping before
averaging, a rank that drops one step's all_reduce; W = 3) are trained once each under autocast with a checkpoint
after every step; their segments of k = 1, 10, 20 steps are retrained by one process in the same precision. The
segment (0, k) is what whole-run verify of a k-step run compares. Prints the distribution of correct errors, the
smallest error a broken run shows where it first goes wrong, and the margins to the tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from disttrain.verify.whole import tolerance
from tests.harness import WorkerPool
from tests.measure_stepwise import BROKEN, MODELS, _errors, _train

KS = (1, 10, 20)
PRECISIONS = ("bf16", "fp16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/precision-measure"))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pools: dict[int, WorkerPool] = {}
    correct: dict[tuple[str, int], list[float]] = {}
    broken: dict[tuple[str, int], list[tuple[float, str]]] = {}
    started = time.perf_counter()
    try:
        for precision in args.precisions:
            for model in args.models:
                overrides = MODELS[model]
                base = [*overrides, "train.dtype=float32", f"train.precision={precision}", "train.global_batch_size=31"]
                for world_size in args.world_sizes:
                    out = _train(pools, world_size, base, args.out / f"{precision}-{model}-w{world_size}", args.steps)
                    for k in KS:
                        errs = _errors(base, out, args.steps, k, "float32")
                        correct.setdefault((precision, k), []).extend(errs)
                        print(f"correct {precision} {model} W={world_size} k={k}: max {max(errs):.2e} "
                              f"median {statistics.median(errs):.2e}", flush=True)
                for name, (extra, skip) in BROKEN.items():
                    cfg = [*base, *extra]
                    tag = f"{precision}-{model}-w3-{name.replace(' ', '_').replace('=', '-')}"
                    out = _train(pools, 3, cfg, args.out / tag, args.steps, skip)
                    for k in KS:
                        errs = _errors(cfg, out, args.steps, k, "float32")
                        first = errs[0] if skip is None else errs[skip[1] // k]
                        broken.setdefault((precision, k), []).append((first, f"{name}, {model}"))
                        print(f"broken {name} {precision} {model} W=3 k={k}: first segment {errs[0]:.2e} where it "
                              f"acts {first:.2e} min {min(errs):.2e}", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    print(f"\nmeasured in {time.perf_counter() - started:.0f} s\n")
    print("| precision | k | correct segments | median | max | tolerance | smallest broken (first failing segment) "
          "| tolerance / max correct | smallest broken / tolerance |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (precision, k), errs in sorted(correct.items()):
        tol = tolerance("float32", k, precision)
        low, what = min(broken[(precision, k)])
        print(f"| {precision} | {k} | {len(errs)} | {statistics.median(errs):.1e} | {max(errs):.1e} | {tol:.0e} | "
              f"{low:.1e} ({what}) | {tol / max(errs):.1f}x | {low / tol:.1f}x |")


if __name__ == "__main__":
    main()

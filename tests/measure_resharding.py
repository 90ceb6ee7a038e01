"""Measure resuming from sharded checkpoints on another number of ranks (prints the table of docs/fault-tolerance.md).

    python -m tests.measure_resharding [--steps 12] [--stop 6] [--out runs/resharding-measure]

For each strategy (fsdp, ddp), each resize (W=2 -> 3, 4 -> 2) and each setting (the SyncBN CNN of tests/test_resume.py
in float64; in float32 with the fp16 loss scaler; with per-sample dropout; with two loader workers per rank, run
through the CLI since a test pool's ranks cannot start processes): the run trained uninterrupted at the first W, and
the same run stopped after ``--stop`` steps with a sharded checkpoint and resumed at the second W. Prints the
largest relative difference of the final parameters, and of the same resume at the first W (bitwise
expected). tests/test_checkpoint_sharded.py asserts a cheap subset.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from disttrain.config import config_from_dict, load_config
from disttrain.errors import ConfigError
from tests.common import max_rel_diff
from tests.harness import WorkerPool
from tests.test_resume import RESIZE, _cfg, train_segment

SETTINGS = {
    "SyncBN, float64": [],
    "SyncBN, fp16 loss scaler, float32": ["train.dtype=float32", "train.precision=fp16", "train.loss_scale=1024"],
    "SyncBN, per-sample dropout 0.2, float64": ["model.dropout=0.2"],
    "SyncBN, 2 loader workers, float64": ["data.workers=2", "train.log_every=100"],
}
RESIZES = ((2, 3), (4, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stop", type=int, default=6)
    parser.add_argument("--impls", nargs="+", default=["fsdp", "ddp"])
    parser.add_argument("--out", type=Path, default=Path("runs/resharding-measure"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pools: dict[int, WorkerPool] = {}

    def on(world_size: int, cfg: dict, resume: bool, until: int | None) -> dict[str, torch.Tensor]:
        if cfg["data"]["workers"]:  # a pool's ranks are daemons, which cannot start loader workers: the CLI's can
            out_dir = Path(cfg["train"]["out_dir"])
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "run.yaml").write_text(config_from_dict(cfg).to_yaml())
            argv = [sys.executable, "-m", "disttrain", "train", str(out_dir / "run.yaml"), "--nproc",
                    str(world_size), *(["--resume"] if resume else []), *(["--stop-at", str(until)] if until else [])]
            subprocess.run(argv, check=True, capture_output=True, timeout=600)
            return {} if until else torch.load(out_dir / "final.pt", weights_only=True)["model"]
        if world_size not in pools:
            pools[world_size] = WorkerPool(world_size, timeout=600)
        pools[world_size].run(train_segment, cfg, resume, until)  # fsdp's own state_dict holds DTensors: read final.pt
        return {} if until else torch.load(Path(cfg["train"]["out_dir"]) / "final.pt", weights_only=True)["model"]

    started = time.perf_counter()
    print("| strategy | W | setting | resumed at the other W: max rel. diff | resumed at the same W |")
    print("|---|---|---|---|---|")
    try:
        for impl in args.impls:
            for first, second in RESIZES:
                for name, extra in SETTINGS.items():
                    base = [*RESIZE, f"comm.impl={impl}", "train.checkpoint_format=sharded",
                            f"train.steps={args.steps}", f"train.checkpoint_every={args.stop}", *extra]
                    try:
                        load_config(None, base)
                    except ConfigError as exc:  # fp16's loss scaler needs the whole gradient, which fsdp never has
                        print(f"| {impl} | {first} -> {second} | {name} | refused: {exc} | |", flush=True)
                        continue
                    out = args.out / f"{impl}-{first}-{second}-{list(SETTINGS).index(name)}"
                    shutil.rmtree(out, ignore_errors=True)
                    whole = on(first, _cfg(base, out / "whole"), False, None)
                    on(first, _cfg(base, out / "parts"), False, args.stop)
                    shutil.copytree(out / "parts", out / "same")
                    other = on(second, _cfg(base, out / "parts"), True, None)
                    same = on(first, _cfg(base, out / "same"), True, None)
                    same_diff = max_rel_diff(same, whole)
                    print(f"| {impl} | {first} -> {second} | {name} | {max_rel_diff(other, whole):.1e} | "
                          f"{'bitwise' if same_diff == 0 else f'{same_diff:.1e}'} |", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

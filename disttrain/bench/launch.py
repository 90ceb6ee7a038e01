"""The two launchers on one config, as separate processes, alternating: `disttrain train --nproc W` vs torchrun.

    disttrain bench launch [--nproc 2] [--steps 30] [--warmup 5] [--rounds 5] [--set KEY=VALUE ...] [--json]

Each round starts, one after the other (the order swapped every round), the same training run twice as a command
a user types: ``python -m disttrain train CONFIG --nproc W`` (the elastic agent inside this package's launcher,
workers started by multiprocessing's spawn) and ``python -m torch.distributed.run --nproc_per_node W -m disttrain
train CONFIG`` (torchrun: the same agent, workers started as fresh interpreters). Per launch: the median of the
steps' own times after ``--warmup`` (metrics.jsonl's ``ms``: from the start of a step's work to its record, data
included), and the launch's wall time from start to exit. The ratio of the two per round is the paired
measurement: both ran back to back, under the same load from elsewhere; its median and spread over rounds say
whether the launchers differ or the difference is noise. The config is bench step's (a CNN, global batch 256,
float32), ``--set`` changes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .common import RunWorld, machine, markdown_table, non_negative_int, positive_int
from .step import bench_config

NPROC, TORCHRUN = "--nproc", "torchrun"


def command(launcher: str, config: Path, nproc: int, out_dir: Path) -> list[str]:
    """The command line of one launch of ``config`` on ``nproc`` local workers."""
    train = ["disttrain", "train", str(config), "--set", f"train.out_dir={out_dir}"]
    if launcher == NPROC:
        return [sys.executable, "-m", *train, "--nproc", str(nproc)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", *train]


def launch_once(launcher: str, config: Path, nproc: int, out_dir: Path, warmup: int, timeout_s: float
                ) -> dict[str, float]:
    """Run one launch to its end; its median step time (ms) after ``warmup`` steps and its wall time (s)."""
    start = time.perf_counter()
    done = subprocess.run(command(launcher, config, nproc, out_dir), capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{launcher} launch exited with {done.returncode}: {last}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_ms": statistics.median(r["ms"] for r in records[warmup:]), "wall_s": wall}


def bench_launch(overrides: list[str], nproc: int, steps: int, warmup: int, rounds: int,
                 timeout_s: float = 600.0) -> dict[str, Any]:
    """Per round, both launchers back to back (order alternating); their times and the per-round ratios."""
    runs: dict[str, list[dict[str, float]]] = {NPROC: [], TORCHRUN: []}
    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as tmp:
        cfg = bench_config([*overrides, f"train.steps={warmup + steps}", "train.log_every=1000",
                            "train.tensorboard=false"], str(Path(tmp) / "unused"))
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        for r in range(rounds):
            for launcher in (NPROC, TORCHRUN) if r % 2 == 0 else (TORCHRUN, NPROC):
                out_dir = Path(tmp) / f"{launcher.strip('-')}{r}"
                runs[launcher].append(launch_once(launcher, config, nproc, out_dir, warmup, timeout_s))
    step_ratios = [a["step_ms"] / b["step_ms"] for a, b in zip(runs[NPROC], runs[TORCHRUN])]
    wall_ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[NPROC], runs[TORCHRUN])]
    return {"runs": runs, "step_ratios": step_ratios, "wall_ratios": wall_ratios,
            "step_ratio": statistics.median(step_ratios), "wall_ratio": statistics.median(wall_ratios),
            # A sign test: with no difference between the launchers, each round is slower either way at even odds.
            "nproc_slower_rounds": sum(ratio > 1 for ratio in step_ratios),
            "best_step_ms": {k: min(run["step_ms"] for run in v) for k, v in runs.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=positive_int, default=2, help="workers per launch (default 2)")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per launch (default 30)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed first steps (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="launches of each, alternating (default 5)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the launched config (default: bench step's)")


def run(args: argparse.Namespace, run_world: RunWorld | None = None) -> dict[str, Any]:
    result = bench_launch(args.overrides, args.nproc, args.steps, args.warmup, args.rounds)
    setting = {"config": args.overrides, "nproc": args.nproc, "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds}
    return {"benchmark": "launch", "machine": machine(), "setting": setting, **result}


def format_table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = [[str(i), f"{a['step_ms']:.2f}", f"{b['step_ms']:.2f}", f"{a['step_ms'] / b['step_ms']:.3f}",
             f"{a['wall_s']:.1f}", f"{b['wall_s']:.1f}"] for i, (a, b) in enumerate(zip(runs[NPROC], runs[TORCHRUN]))]
    rows.append(["median", "", "", f"{result['step_ratio']:.3f}", "", f"wall ratio {result['wall_ratio']:.3f}"])
    rows.append(["--nproc slower", "", "", f"{result['nproc_slower_rounds']} of {len(runs[NPROC])} rounds", "", ""])
    return markdown_table(["round", "--nproc ms/step", "torchrun ms/step", "--nproc / torchrun", "--nproc wall s",
                           "torchrun wall s"], rows)


__all__ = ["bench_launch", "command", "launch_once"]

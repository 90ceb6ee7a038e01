"""The two launchers on one config, as separate processes, alternating: `disttrain train --nproc W` vs torchrun.

    disttrain bench launch [--nproc 2] [--steps 30] [--warmup 5] [--rounds 5] [--busy 0] [--set KEY=VALUE ...] [--json]

Each round starts, one after the other (the order swapped every round), the same training run twice as a command
a user types: ``python -m disttrain train CONFIG --nproc W`` (the elastic agent inside this package's launcher)
and ``python -m torch.distributed.run --nproc_per_node W -m disttrain train CONFIG`` (torchrun: the same agent).
Both start workers as fresh interpreters, each in a session of its own. Per launch: the median of the steps' own
times after ``--warmup`` (metrics.jsonl's ``ms``: from the start of a step's work to its record, data included),
the time from the launch to its first step's record (start-up: imports, rendezvous, the model), and the launch's
wall time from start to exit. ``--busy N`` runs N busy loops in a session of their own for the whole benchmark: a
machine shared with other jobs, where the kernel's autogroup scheduling shares the CPU between sessions first. The ratio of the two per round is the paired
measurement: both ran back to back, under the same load from elsewhere; its median and spread over rounds say
whether the launchers differ or the difference is noise. The config is bench step's (a CNN, global batch 256,
float32), ``--set`` changes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
    """Run one launch to its end; its median step time (ms) after ``warmup`` steps, the time from its start to its
    first step's record (s: the trainer writes that record at once) and its wall time (s)."""
    metrics = out_dir / "metrics.jsonl"
    first_step = math.nan
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command(launcher, config, nproc, out_dir), stdout=subprocess.DEVNULL, stderr=err,
                                text=True)
        try:
            while proc.poll() is None:
                if math.isnan(first_step) and metrics.is_file() and metrics.stat().st_size > 0:
                    first_step = time.perf_counter() - start
                if time.perf_counter() - start > timeout_s:
                    raise RuntimeError(f"{launcher} launch did not end within {timeout_s:g} s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            last = (err.read().strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{launcher} launch exited with {proc.returncode}: {last}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"step_ms": statistics.median(r["ms"] for r in records[warmup:]), "first_step_s": first_step,
            "wall_s": wall}


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes that spin in a session of their own (another user's jobs), for the block's duration."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
             for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def bench_launch(overrides: list[str], nproc: int, steps: int, warmup: int, rounds: int, busy: int = 0,
                 timeout_s: float = 600.0) -> dict[str, Any]:
    """Per round, both launchers back to back (order alternating); their times and the per-round ratios."""
    runs: dict[str, list[dict[str, float]]] = {NPROC: [], TORCHRUN: []}
    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as tmp, busy_loops(busy):
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
    first_step_gaps = [a["first_step_s"] - b["first_step_s"] for a, b in zip(runs[NPROC], runs[TORCHRUN])]
    return {"runs": runs, "step_ratios": step_ratios, "wall_ratios": wall_ratios,
            "step_ratio": statistics.median(step_ratios), "wall_ratio": statistics.median(wall_ratios),
            "first_step_gaps_s": first_step_gaps, "first_step_gap_s": statistics.median(first_step_gaps),
            # A sign test: with no difference between the launchers, each round is slower either way at even odds.
            "nproc_slower_rounds": sum(ratio > 1 for ratio in step_ratios),
            "best_step_ms": {k: min(run["step_ms"] for run in v) for k, v in runs.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=positive_int, default=2, help="workers per launch (default 2)")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per launch (default 30)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed first steps (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="launches of each, alternating (default 5)")
    parser.add_argument("--busy", type=non_negative_int, default=0,
                        help="busy-loop processes in a session of their own while it runs (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the launched config (default: bench step's)")


def run(args: argparse.Namespace, run_world: RunWorld | None = None) -> dict[str, Any]:
    result = bench_launch(args.overrides, args.nproc, args.steps, args.warmup, args.rounds, args.busy)
    setting = {"config": args.overrides, "nproc": args.nproc, "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds, "busy": args.busy}
    return {"benchmark": "launch", "machine": machine(), "setting": setting, **result}


def format_table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = [[str(i), f"{a['step_ms']:.2f}", f"{b['step_ms']:.2f}", f"{a['step_ms'] / b['step_ms']:.3f}",
             f"{a['first_step_s']:.1f}", f"{b['first_step_s']:.1f}", f"{a['wall_s']:.1f}", f"{b['wall_s']:.1f}"]
            for i, (a, b) in enumerate(zip(runs[NPROC], runs[TORCHRUN]))]
    rows.append(["median", "", "", f"{result['step_ratio']:.3f}", f"gap {result['first_step_gap_s']:+.1f} s", "",
                 f"wall ratio {result['wall_ratio']:.3f}", ""])
    rows.append(["--nproc slower", "", "", f"{result['nproc_slower_rounds']} of {len(runs[NPROC])} rounds", "", "",
                 "", ""])
    return markdown_table(["round", "--nproc ms/step", "torchrun ms/step", "--nproc / torchrun", "--nproc first step s",
                           "torchrun first step s", "--nproc wall s", "torchrun wall s"], rows)


__all__ = ["bench_launch", "busy_loops", "command", "launch_once"]

"""Strong scaling of the trainer: a fixed global batch over W = 1..N processes, time per step and efficiency.

    disttrain bench scaling [--world-sizes 1,2,4] [--steps 20] [--warmup 5] [--rounds 5] [--set KEY=VALUE ...] [--json]

The global batch stays the same, so W ranks each compute 1/W of it and communicate the same gradient:
ideal strong scaling is T_W = T_1 / W, and the efficiency T_1 / (W * T_W) is the fraction of that ideal
reached. Every rank has one intra-op thread, so W=1 uses one core and the comparison stays fair on a
machine with few cores (with more ranks than cores, the ranks share cores and the efficiency says so).
Time per step as in ``bench step`` (start of one step to the start of the next, median, slowest rank);
W=1 is always measured, as the base.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from ..config.validate import check_world_size
from ..config.parse import config_from_dict
from .common import RunWorld, markdown_table, spawn_world
from .step import add_run_arguments, bench_config, run_result, trainer_steps


def _rank_scaling(cfg_dict: dict[str, Any], steps: int, warmup: int, rounds: int) -> list[float]:
    times: list[float] = []
    for _ in range(rounds):
        times += trainer_steps(cfg_dict, steps, warmup).periods(warmup)
    return times


def bench_scaling(overrides: list[str], world_sizes: tuple[int, ...] = (1, 2, 4), steps: int = 20, warmup: int = 5,
                  rounds: int = 5, run_world: RunWorld = spawn_world) -> list[dict[str, Any]]:
    """One row per world size (1 first): ms per step, speedup T_1/T_W and efficiency T_1/(W T_W)."""
    world_sizes = tuple(dict.fromkeys((1, *world_sizes)))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as out_dir:
        cfg_dict = bench_config(overrides, out_dir)
        cfg = config_from_dict(cfg_dict)
        for world_size in world_sizes:
            check_world_size(cfg, world_size)
        for world_size in world_sizes:
            per_rank = run_world(world_size, _rank_scaling, cfg_dict, steps, warmup, rounds)
            ms = 1e3 * max(statistics.median(times) for times in per_rank)
            base = rows[0]["ms"] if rows else ms
            rows.append({"world_size": world_size, "global_batch_size": cfg.train.global_batch_size,
                         "ms": ms, "samples_per_s": cfg.train.global_batch_size / ms * 1e3,
                         "speedup": base / ms, "efficiency": base / (world_size * ms)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, (1, 2, 4),
                      "comma-separated process counts; 1 is always added as the base (default 1,2,4)", 5,
                      "runs per world size (default 5)")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    return run_result("scaling", args, bench_scaling(args.overrides, args.world_sizes, args.steps, args.warmup,
                                                     args.rounds, run_world))


def format_table(result: dict[str, Any]) -> str:
    return markdown_table(["W", "global batch", "ms/step", "samples/s", "speedup T1/TW", "efficiency T1/(W TW)"], [
        [str(r["world_size"]), str(r["global_batch_size"]), f"{r['ms']:.2f}", f"{r['samples_per_s']:.0f}",
         f"{r['speedup']:.2f}", f"{r['efficiency']:.2f}"] for r in result["rows"]])

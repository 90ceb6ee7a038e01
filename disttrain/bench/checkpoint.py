"""Benchmark: what a checkpoint costs each rank, full vs sharded (torch's DCP), and what the loop waits for.

    disttrain bench checkpoint [--hidden 7168] [--world-sizes 2,4] [--saves 3] [--variants ...] [--json]

The model is the built-in mlp (two hidden layers of ``--hidden`` units: 52.8M parameters at 7168) under
``comm.impl: fsdp`` with AdamW, float32, on W gloo processes; one training step fills the optimizer state, then the
trainer's own Checkpointer saves ``--saves`` times, each after another step. Every variant runs in fresh processes
(a process's resident set never shrinks back, so variants sharing one would measure each other):

- ``full``: the whole state gathered to rank 0, written by rank 0's background thread (``checkpoint_async``: the
  loop waits for the gather and the CPU copy); ``full-sync``: the same, waiting for the file;
- ``sharded``: every rank writes its own shards through DCP and the loop waits until they are durable;
- ``sharded-async``: every rank stages a copy of its shards and a background thread writes it.

Every variant runs at the first world size; the two formats with their defaults (full, sharded) at the others.

Per rank: the peak resident set size while a save is in progress (sampled every millisecond from /proc, the torch
runtime and the rank's own training state included) and before the first save; the bytes the rank wrote; the
median time the loop was blocked per save (``Checkpointer.save``), and for the asynchronous variants the time
until the write was durable. Then a W=2 -> W=4 resume from each format's last checkpoint: the time until every rank
holds its state (the slowest rank). A benchmark prints numbers; nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..checkpoint.layout import list_checkpoints
from ..checkpoint.resume import load_training_state, resume_state
from ..checkpoint.sharded import bytes_per_rank, read_manifest
from ..checkpoint.writer import Checkpointer
from ..config.parse import load_config
from ..parallel.env import distributed
from ..run.build import build
from ..run.step import train_step
from .common import RunWorld, machine, markdown_table, positive_int, positive_ints, spawn_world

VARIANTS = {"full": ("full", True), "full-sync": ("full", False), "sharded": ("sharded", False),
            "sharded-async": ("sharded", True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=positive_int, default=7168,
                        help="the mlp's hidden width (default 7168: 52.8M parameters)")
    parser.add_argument("--world-sizes", type=positive_ints, default=(2, 4), help="default 2,4")
    parser.add_argument("--saves", type=positive_int, default=3, help="saves per variant (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, default all: {', '.join(VARIANTS)}")


def _overrides(hidden: int, out_dir: str, variant: str) -> list[str]:
    fmt, background = VARIANTS[variant]
    return ["model.name=mlp", f"model.hidden={hidden}", "optim.name=adamw", "comm.impl=fsdp",
            "train.global_batch_size=8", "data.num_samples=64", "train.steps=100", "train.device=cpu",
            f"train.out_dir={out_dir}", f"train.checkpoint_format={fmt}",
            f"train.checkpoint_async={str(background).lower()}", "train.keep_checkpoints=1", "train.checkpoint_every=1",
            "train.tensorboard=false"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """The largest resident set size seen while running (sampled every millisecond on a thread)."""

    def __init__(self) -> None:
        self.peak, self._on = _rss(), threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self._on.is_set():
                self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def during(self, on: bool) -> None:
        if on:
            self.peak = _rss()
            self._on.set()
        else:
            self.peak = max(self.peak, _rss())
            self._on.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def measure_saves(overrides: list[str], saves: int) -> dict[str, Any]:
    """On every rank: a step, then ``saves`` times a save and a step; peak RSS during the saves, blocked and durable
    seconds per save, bytes written by this rank."""
    cfg = load_config(None, overrides)
    with distributed("cpu", cfg.comm.timeout_s) as env:
        parts = build(cfg, env)
        t = cfg.train
        if env.is_main:
            (Path(t.out_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)  # as the trainer makes it
        steps = parts.batches.steps(0, saves + 1, env.device, 1)

        def step() -> None:
            index, micro_batches = next(steps)
            train_step(parts.sync, parts.optimizer, micro_batches, cfg.clip, index)
            parts.scheduler.step()
        step()
        checkpointer = Checkpointer(t.out_dir, t.checkpoint_every, t.keep_checkpoints, t.steps, env.is_main,
                                    sharded=t.checkpoint_format == "sharded", background=t.checkpoint_async,
                                    timeout_s=cfg.comm.timeout_s)
        before, sampler = _rss(), _PeakRSS()
        blocked, durable = [], []
        try:
            for done in range(1, saves + 1):
                sampler.during(True)
                start = time.perf_counter()
                checkpointer.save(parts.sync, parts.optimizer, parts.scheduler, done, 0, cfg.to_dict(),
                                  env.world_size)
                blocked.append(time.perf_counter() - start)
                checkpointer.close()  # waits for a background write: its time is the durable time, not the loop's
                durable.append(time.perf_counter() - start)
                sampler.during(False)
                step()
        finally:
            sampler.close()
        parts.batches.close()
        written = _bytes_written(Path(t.out_dir), env.rank)
        params = sum(p.numel() for p in parts.sync.model.parameters())  # fsdp: DTensors, the whole count
    return {"params": params, "rss_before": before, "rss_peak": sampler.peak, "blocked_s": statistics.median(blocked),
            "durable_s": statistics.median(durable), "bytes": written}


def _bytes_written(out_dir: Path, rank: int) -> int:
    _, path = list_checkpoints(out_dir)[-1]
    if path.is_dir():
        return bytes_per_rank(read_manifest(path)).get(rank, 0)
    return path.stat().st_size if rank == 0 else 0


def measure_resume(overrides: list[str]) -> float:
    """On every rank: seconds from the decision to resume until this rank holds its state."""
    cfg = load_config(None, overrides)
    with distributed("cpu", cfg.comm.timeout_s) as env:
        parts = build(cfg, env)
        start = time.perf_counter()
        state = resume_state(cfg, env, True)
        load_training_state(parts.sync, parts.optimizer, state, env.is_main)
        parts.scheduler.load_state_dict(state["scheduler"])
        seconds = time.perf_counter() - start
        parts.batches.close()
    return seconds


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    rows, resumes = [], []
    scratch = Path(tempfile.mkdtemp(prefix="disttrain-bench-checkpoint-"))
    try:
        for w in args.world_sizes:  # every variant at the first W; the two formats at the others
            for variant in variants if w == args.world_sizes[0] else [v for v in variants if v in ("full", "sharded")]:
                out_dir = scratch / f"{variant}-{w}"
                per_rank = run_world(w, measure_saves, _overrides(args.hidden, str(out_dir), variant), args.saves)
                rows.append({"variant": variant, "world_size": w, "ranks": per_rank})
        for variant in ("full", "sharded"):  # the newest checkpoint of the W=2 run, read by 4 ranks
            source = scratch / f"{variant}-2"
            if source.is_dir():
                seconds = run_world(4, measure_resume, _overrides(args.hidden, str(source), variant))
                resumes.append({"format": variant, "from": 2, "to": 4, "seconds": max(seconds)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    params = rows[0]["ranks"][0]["params"] if rows else 0
    return {"benchmark": "checkpoint", "machine": machine(), "hidden": args.hidden, "params": params,
            "saves": args.saves, "rows": rows, "resume": resumes, "ratios": ratios(rows, resumes)}


def ratios(rows: list[dict[str, Any]], resumes: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's peak RSS during a save, sharded over full (goal <= 0.6 at W=2); blocked time per save, sharded-async
    over sharded (goal <= 0.2); resume W=2 -> 4, sharded over full."""
    def row(variant: str, w: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["variant"], r["world_size"]) == (variant, w)), None)
    out: dict[str, Any] = {}
    for w in dict.fromkeys(r["world_size"] for r in rows):
        full, sharded, background = row("full", w), row("sharded", w), row("sharded-async", w)
        if full and sharded:
            out[f"rank0_peak_rss_sharded_over_full_w{w}"] = sharded["ranks"][0]["rss_peak"] / full["ranks"][0]["rss_peak"]
        if sharded and background:
            out[f"blocked_async_over_sync_w{w}"] = (max(r["blocked_s"] for r in background["ranks"]) /
                                                    max(r["blocked_s"] for r in sharded["ranks"]))
    times = {r["format"]: r["seconds"] for r in resumes}
    if {"full", "sharded"} <= times.keys():
        out["resume_2_to_4_sharded_over_full"] = times["sharded"] / times["full"]
    return out


def format_table(result: dict[str, Any]) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    table = []
    for r in result["rows"]:
        ranks = r["ranks"]
        table.append([r["variant"], str(r["world_size"]), " / ".join(mib(x["rss_before"]) for x in ranks),
                      " / ".join(mib(x["rss_peak"]) for x in ranks), " / ".join(mib(x["bytes"]) for x in ranks),
                      f"{1000 * max(x['blocked_s'] for x in ranks):.0f}",
                      f"{1000 * max(x['durable_s'] for x in ranks):.0f}"])
    lines = [f"mlp hidden {result['hidden']} ({result['params'] / 1e6:.1f}M parameters), fsdp, AdamW, float32, gloo; per rank (rank 0 / rank 1 / ...); "
             f"median of {result['saves']} saves, the slowest rank's:", "",
             markdown_table(["variant", "W", "RSS before MiB", "peak RSS during save MiB", "written MiB",
                             "loop blocked ms", "durable ms"], table), ""]
    for r in result["resume"]:
        lines.append(f"resume W={r['from']} -> W={r['to']} from {r['format']}: {r['seconds']:.2f} s (slowest rank)")
    for name, value in result["ratios"].items():
        lines.append(f"{name}: {value:.3f}")
    return "\n".join(lines)

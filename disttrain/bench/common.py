"""What the benchmarks share: W gloo processes with one intra-op thread each, timing, medians, output.

A benchmark's per-rank work is a module-level function that runs on every rank of a W-process gloo group
(the default process group); ``run_world(W, fn, *args)`` returns its per-rank results in rank order.
:func:`spawn_world` starts W fresh processes for that (the launcher's, as ``--nproc`` does); a caller that already holds W ranks (a pool of
workers) can pass its own ``run_world``.

One intra-op thread per rank: W processes share the machine's cores, and torch's default (one thread per
core in every process) would oversubscribe them. Times are per call or per step, in seconds inside the
ranks; a synchronised operation is as fast as its slowest rank, so a benchmark reports the slowest rank's
median.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..parallel.launch import launch_local_tasks, one_thread

RunWorld = Callable[..., list[Any]]


def _on_rank(env: Any, fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args)


def spawn_world(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 900.0) -> list[Any]:
    """Run ``fn(*args)`` on every rank of ``world_size`` fresh gloo processes (launcher.launch_local_tasks, one
    intra-op thread each); the results in rank order. A rank that raises ends the benchmark with its error
    (RunFailure); ``timeout_s`` bounds every collective, so a hung rank ends it too."""
    tasks = [(one_thread, ()), (_on_rank, (fn, args))]
    return [results[1] for results in launch_local_tasks(tasks, world_size, "cpu", timeout_s)]


def time_calls(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds per call of ``fn``, ``n`` calls."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(variants: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[list[float]]]:
    """Run every variant once per round, the order rotated each round, after a barrier on every rank.

    Each call returns its own list of times; the result holds them per variant and round. Alternating the
    variants in rounds exposes them alike to load from elsewhere on a shared machine, so their ratio is
    measured side by side (see :func:`paired_ratios`).
    """
    names = list(variants)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if dist.is_initialized():
                dist.barrier()
            times[name].append(variants[name]())
    return times


class StepClock:
    """A stamp at the start of every step: the wall time, and the minor page faults of this process so far.

    Page faults are counted because on CPU they can be a large part of a step: memory that the C allocator
    handed back to the operating system and takes again is zero-filled page by page on first touch.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.faults: list[int] = []

    def stamp(self) -> None:
        self.times.append(time.perf_counter())
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def periods(self, warmup: int) -> list[float]:
        """Seconds from the start of each step to the start of the next, the first ``warmup`` steps dropped."""
        return [b - a for a, b in zip(self.times[warmup:], self.times[warmup + 1:])]

    def faults_per_step(self, warmup: int) -> list[int]:
        return [b - a for a, b in zip(self.faults[warmup:], self.faults[warmup + 1:])]


def slowest_median_ms(per_rank: Sequence[dict[str, list[list[float]]]]) -> dict[str, float]:
    """Name -> the largest of the ranks' median times over all rounds, in milliseconds."""
    return {name: 1e3 * max(statistics.median(t for times in r[name] for t in times) for r in per_rank)
            for name in per_rank[0]}


def paired_ratios(per_rank: Sequence[dict[str, list[list[float]]]], a: str, b: str) -> list[float]:
    """Per round: time of ``a`` / time of ``b`` (each the slowest rank's median in that round).

    The two ran back to back, so a load that comes and goes over minutes cancels out of each ratio; the
    median of these ratios is steadier than the ratio of the overall medians on a shared machine.
    """
    def per_round(name: str) -> list[float]:
        rounds = len(per_rank[0][name])
        return [max(statistics.median(r[name][i]) for r in per_rank) for i in range(rounds)]

    return [x / y for x, y in zip(per_round(a), per_round(b))]


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    return {"torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "backend": "gloo", "threads_per_rank": 1}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def positive_int(text: str, least: int = 1) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return positive_int(text, least=0)


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: "1,2,4" -> (1, 2, 4), each >= 1."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_sizes(text: str) -> tuple[int, ...]:
    """argparse type: "1KiB,64MiB" -> (1024, 67108864); plain numbers are bytes; each a multiple of 4."""
    values = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*([KMG]iB|B)?\s*", item, flags=re.IGNORECASE)
        if not match:
            raise argparse.ArgumentTypeError(f"expected sizes like 1KiB,4MiB, got {item!r}")
        size = int(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
        if size < 4 or size % 4:
            raise argparse.ArgumentTypeError(f"sizes must be positive multiples of 4 bytes, got {item!r}")
        values.append(size)
    return tuple(values)


def format_bytes(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"

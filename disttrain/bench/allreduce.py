"""all_reduce bandwidth over message sizes, against the memory-copy bandwidth of the same machine.

    disttrain bench allreduce [--world-sizes 2,4] [--sizes 1KiB,...,64MiB] [--iters 20] [--json]

Reported as nccl-tests reports it: for a message of S bytes on every rank taking t seconds,
algbw = S / t and busbw = algbw * 2(W-1)/W. A ring all_reduce sends and receives 2(W-1)/W * S bytes
per rank, so busbw is the bandwidth each rank's link sustained, comparable across W. On one host the
links are memory: the physical limit is the memory-copy bandwidth, measured on rank 0 with one thread
copying a buffer of the same size (S / t_copy: bytes copied per second; small buffers copy from cache).
Small messages are latency-bound (the time per call hardly changes with S); large ones bandwidth-bound.
float32 tensors, gloo, one intra-op thread per rank; the median per call on the slowest rank.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.distributed as dist

from .common import RunWorld, byte_sizes, format_bytes, machine, markdown_table, positive_int, positive_ints, spawn_world, time_calls

DEFAULT_SIZES = tuple(2**10 * 4**i for i in range(9))  # 1 KiB, 4 KiB, ..., 64 MiB


def calls_for(size: int, iters: int) -> int:
    """Timed calls for a message of ``size`` bytes: ``iters`` up to 4 MiB, fewer above (at least 5)."""
    return max(min(iters, 5), min(iters, iters * 4 * 2**20 // size))


def _rank_allreduce(sizes: tuple[int, ...], iters: int) -> list[dict[str, list[float]]]:
    """On every rank: seconds per all_reduce (and on rank 0 per copy) for every size."""
    out = []
    for size in sizes:
        x = torch.ones(size // 4, dtype=torch.float32)
        n = calls_for(size, iters)
        time_calls(lambda: dist.all_reduce(x), 2)  # warm-up: connections, buffers
        dist.barrier()
        times = {"all_reduce": time_calls(lambda: dist.all_reduce(x), n)}
        dist.barrier()
        if dist.get_rank() == 0:  # alone, while the others wait: the copy does not share the memory bus
            y = torch.empty_like(x)
            time_calls(lambda: y.copy_(x), 2)
            times["memcpy"] = time_calls(lambda: y.copy_(x), n)
        dist.barrier()
        out.append(times)
    return out


def bench_allreduce(world_sizes: tuple[int, ...] = (2, 4), sizes: tuple[int, ...] = DEFAULT_SIZES, iters: int = 20,
                    run_world: RunWorld = spawn_world) -> list[dict[str, Any]]:
    """One row per (world size, message size): time per call, algbw, busbw and memcpy bandwidth in GB/s."""
    rows = []
    for world_size in world_sizes:
        per_rank = run_world(world_size, _rank_allreduce, sizes, iters)
        for i, size in enumerate(sizes):
            t = max(statistics.median(r[i]["all_reduce"]) for r in per_rank)
            t_copy = statistics.median(per_rank[0][i]["memcpy"])
            algbw = size / t / 1e9
            busbw = algbw * 2 * (world_size - 1) / world_size
            memcpy = size / t_copy / 1e9
            rows.append({"world_size": world_size, "bytes": size, "us": 1e6 * t, "algbw_gbps": algbw,
                         "busbw_gbps": busbw, "memcpy_gbps": memcpy, "busbw_vs_memcpy": busbw / memcpy})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-sizes", type=positive_ints, default=(2, 4),
                        help="comma-separated process counts (default 2,4)")
    parser.add_argument("--sizes", type=byte_sizes, default=DEFAULT_SIZES,
                        help="comma-separated message sizes, e.g. 1KiB,64MiB (default 1 KiB to 64 MiB, x4)")
    parser.add_argument("--iters", type=positive_int, default=20,
                        help="timed calls per size up to 4 MiB, fewer above (default 20)")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    rows = bench_allreduce(args.world_sizes, args.sizes, args.iters, run_world)
    return {"benchmark": "allreduce", "machine": machine(), "setting": {"iters": args.iters, "dtype": "float32"},
            "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    return markdown_table(["W", "size", "time us", "algbw GB/s", "busbw GB/s", "memcpy GB/s", "busbw / memcpy"], [
        [str(r["world_size"]), format_bytes(r["bytes"]), f"{r['us']:.0f}", f"{r['algbw_gbps']:.3f}",
         f"{r['busbw_gbps']:.3f}", f"{r['memcpy_gbps']:.2f}", f"{r['busbw_vs_memcpy']:.3f}"]
        for r in result["rows"]])

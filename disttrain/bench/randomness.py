"""Benchmark: what per-sample randomness costs per training step (one process, the built-in CNN).

    disttrain bench randomness [--batch 256] [--hidden 64] [--steps 100] [--json]

Side by side in one run, one step of each variant in turn, so machine noise hits every variant alike:
- ``none``: no dropout, no augmentation;
- ``dropout``: model.dropout=0.2 with disttrain's per-sample dropout (before the head);
- ``dropout+flip_crop``: the same plus per-sample flip and padded crop of every image;
- ``torch dropout``: torch's nn.Dropout in the same place (per-process RNG: not equivalent), for scale.
Prints the median and the minimum step time of each (train_step: forward, backward, optimizer step; float32,
one thread; on a shared machine the minimum is the steadier number: interference only adds time), and
the time of one dropout mask over a million activations (per-sample SampleDropout and torch's) and of flip_crop
on a CIFAR-sized batch (256 images of 3x32x32, padding 4).
A benchmark prints numbers; nothing here is a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..run.build import build
from ..config.parse import load_config
from ..data.augment import augment_images
from ..parallel.env import DistEnv
from ..randomness import SampleDropout, SampleKeys, assign_streams, sample_keys
from ..run.step import train_step
from .common import RunWorld, machine, markdown_table, positive_int, spawn_world

VARIANTS = {
    "none": ["model.dropout=0", "data.augment=none"],
    "dropout": ["model.dropout=0.2", "data.augment=none"],
    "dropout+flip_crop": ["model.dropout=0.2", "data.augment=flip_crop"],
    "torch dropout": ["model.dropout=0.2", "data.augment=none"],
}


def _torch_dropout(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, SampleDropout):
            module.add_module(name, nn.Dropout(child.p))
        else:
            _torch_dropout(child)
    return module


def _setup(name: str, batch: int, hidden: int):
    cfg = load_config(None, ["model.name=cnn", f"model.hidden={hidden}", "train.device=cpu",
                             f"data.num_samples={4 * batch}", f"train.global_batch_size={batch}", *VARIANTS[name]])
    parts = build(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None))
    if name == "torch dropout":
        _torch_dropout(parts.sync.model)
    parts.sync.model.train()
    return cfg, parts.batches, parts.sync, parts.optimizer


def bench(batch: int = 256, hidden: int = 64, steps: int = 100) -> dict[str, tuple[float, float]]:
    """(median, minimum) milliseconds per step for each variant."""
    torch.set_num_threads(1)
    setups = {name: _setup(name, batch, hidden) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu = torch.device("cpu")
    for step in range(steps + 5):  # the first 5 warm up
        for name, (cfg, batches, sync, optimizer) in setups.items():
            start = time.perf_counter()
            train_step(sync, optimizer, batches.keyed_micro_batches(step, cpu, 1), cfg.clip, step, cfg.train.loss)
            if step >= 5:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def bench_mask(samples: int = 256, per_sample: int = 4096, rounds: int = 30) -> dict[str, float]:
    """Minimum milliseconds of one dropout forward (p = 0.2, training mode) on samples x per_sample activations."""
    torch.set_num_threads(1)
    x = torch.randn(samples, per_sample)
    ours = assign_streams(nn.Sequential(SampleDropout(0.2)))[0]
    theirs = nn.Dropout(0.2)
    keys = SampleKeys(0, 0, torch.arange(samples))
    times: dict[str, list[float]] = {"per-sample": [], "torch": []}
    for r in range(rounds + 1):
        for name, layer in (("per-sample", ours), ("torch", theirs)):
            start = time.perf_counter()
            with sample_keys(keys):
                layer(x)
            if r > 0:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: min(t) for name, t in times.items()}


def bench_augment(samples: int = 256, size: int = 32, padding: int = 4, rounds: int = 30) -> float:
    """Minimum milliseconds of flip_crop on ``samples`` images of 3 x size x size."""
    torch.set_num_threads(1)
    x = torch.randn(samples, 3, size, size)
    keys = SampleKeys(0, 0, torch.arange(samples))
    times = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        augment_images(x, keys, "flip_crop", padding)
        if r > 0:
            times.append(1000 * (time.perf_counter() - start))
    return min(times)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=256, help="samples per step (default 256)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="model.hidden of the cnn (default 64)")
    parser.add_argument("--steps", type=positive_int, default=100, help="timed steps per variant (default 100)")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    """One process (no process group: the cost is per sample, not per rank)."""
    steps = bench(args.batch, args.hidden, args.steps)
    base_min = steps["none"][1]
    mask = bench_mask()
    return {"benchmark": "randomness", "machine": machine(),
            "setting": {"batch": args.batch, "hidden": args.hidden, "steps": args.steps, "dtype": "float32",
                        "threads": 1},
            "rows": [{"variant": name, "median_ms": median, "min_ms": least, "min_vs_none": least / base_min}
                     for name, (median, least) in steps.items()],
            "dropout_mask_ms": mask, "flip_crop_ms": bench_augment()}


def format_table(result: dict[str, Any]) -> str:
    st = result["setting"]
    lines = [f"cnn hidden {st['hidden']}, batch {st['batch']} of 3x8x8 images, float32, 1 thread, "
             f"{st['steps']} steps each", ""]
    lines.append(markdown_table(["variant", "median ms/step", "min ms/step", "min vs none"], [
        [r["variant"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{100 * (r['min_vs_none'] - 1):+.1f} %"]
        for r in result["rows"]]))
    mask = result["dropout_mask_ms"]
    lines += ["", f"dropout mask (p=0.2) over 256 x 4096 = 1.05M float32 activations (min): per-sample "
              f"{mask['per-sample']:.2f} ms, torch nn.Dropout {mask['torch']:.2f} ms",
              f"flip_crop of 256 images of 3x32x32, padding 4 (min): {result['flip_crop_ms']:.2f} ms"]
    return "\n".join(lines)

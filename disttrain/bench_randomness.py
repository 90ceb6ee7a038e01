"""Benchmark: what per-sample randomness costs per training step (one process, the built-in CNN).

    python -m disttrain.bench_randomness [--batch 256] [--hidden 64] [--steps 100]

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
import sys
import time

import torch
from torch import nn

from .comm import LocalSync
from .config import load_config
from .data import GlobalBatches, augment_images, build_dataset
from .models import build_model
from .randomness import SampleDropout, SampleKeys, assign_streams, sample_keys
from .train import build_optimizer, train_step

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
    data = build_dataset(cfg.data, cfg.model.name, cfg.seed, torch.float32)
    batches = GlobalBatches(data, batch, cfg.seed, 0, 1)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, torch.float32, torch.device("cpu"))
    if name == "torch dropout":
        model = _torch_dropout(model)
    model.train()
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    return cfg, batches, LocalSync(model, batch), optimizer


def bench(batch: int = 256, hidden: int = 64, steps: int = 100) -> dict[str, tuple[float, float]]:
    """(median, minimum) milliseconds per step for each variant."""
    torch.set_num_threads(1)
    setups = {name: _setup(name, batch, hidden) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu = torch.device("cpu")
    for step in range(steps + 5):  # the first 5 warm up
        for name, (cfg, batches, sync, optimizer) in setups.items():
            start = time.perf_counter()
            train_step(sync, optimizer, batches.keyed_micro_batches(step, cpu, 1), cfg.clip, step)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disttrain.bench_randomness", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="samples per step")
    parser.add_argument("--hidden", type=int, default=64, help="model.hidden of the cnn")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    args = parser.parse_args(argv)
    if min(args.batch, args.hidden, args.steps) < 1:
        parser.error("--batch, --hidden and --steps must be >= 1")
    result = bench(args.batch, args.hidden, args.steps)
    base_median, base_min = result["none"]
    print(f"cnn hidden {args.hidden}, batch {args.batch} of 3x8x8 images, float32, 1 thread, {args.steps} steps each")
    print("| variant | median ms/step | min ms/step | min vs none |")
    print("|---|---|---|---|")
    for name, (median, least) in result.items():
        print(f"| {name} | {median:.2f} | {least:.2f} | {least - base_min:+.2f} ms ({100 * (least / base_min - 1):+.1f} %) |")
    mask = bench_mask()
    print(f"dropout mask (p=0.2) over 256 x 4096 = 1.05M float32 activations (min): per-sample {mask['per-sample']:.2f} "
          f"ms, torch nn.Dropout {mask['torch']:.2f} ms")
    print(f"flip_crop of 256 images of 3x32x32, padding 4 (min): {bench_augment():.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

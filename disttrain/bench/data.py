"""Benchmark: data read from disk: loader throughput, step time from disk vs memory, start-up vs dataset size.

    disttrain bench data [--steps 20] [--rounds 5] [--sizes 10000,300000] [--batch 128] [--json]

One process (rank 0 of 1, no process group), one intra-op thread; loader workers are extra processes. Measured
side by side in one run, the variants of each part alternating in rounds (the order rotated each round), medians
over rounds:

1. Loader throughput: samples/s of ``GlobalBatches(...).steps()`` alone, nothing trained, for data.workers 0, 1
   and 2, on an image folder (scikit-learn's 1,797 digits exported as PNGs by ``disttrain data export digits``,
   decoded by Pillow and resized to 32x32, per-sample flip_crop). Throughput counts the steps after the first
   (steady state); the time to the first batch (which holds starting the workers) is reported apart.
2. Step time, disk vs memory: ms per training step of the trainer (``Trainer``, the time from the start of one
   step to the start of the next, the first steps dropped) on the cnn, float32, W=1, for the same samples as
   (a) ``arrays``: the images decoded and resized once, saved as float32 x.npy (memory-mapped and in the page
   cache: a batch is a copy of its rows), (b) ``imagefolder`` with data.workers 0 (decoded in the training
   process), (c) ``imagefolder`` with 2 workers; each with its ratio to (a). The three read identical samples,
   so their losses must be identical; the table says whether they were. On a 2-core machine 2 workers compete
   with the training process for the cores: they cannot hide the decoding there, only move it.
3. Start-up and memory vs dataset size: ``arrays`` of ``--sizes`` random uint8 samples 3x32x32 (written in
   chunks; just written, so in the page cache); a fresh process on each trains 2 steps and reports the time from
   its start (before the interpreter loads) to the end of the first step, its peak RSS (VmHWM, not ru_maxrss,
   which Linux carries over an exec from the (larger) parent) and the bytes it read from the files per sample
   (x and y rows by ``pread``: 3,072 + 8 bytes, nothing read ahead or mapped; disk.FileRows). Largest/smallest against targets (reported, not
   asserted): RSS within 1.25x, time within 1.3x + 2 s: memory-mapped data must not be read whole at start-up.

A benchmark prints numbers; nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..run.build import build_data
from ..config.schema import Config
from ..config.parse import load_config
from ..data.loader import GlobalBatches
from ..data.export import export_digits
from ..parallel.env import DistEnv
from ..errors import ConfigError, RunFailure
from ..run.train import Hook, Trainer
from .common import RunWorld, StepClock, interleaved, machine, markdown_table, paired_ratios, positive_int, positive_ints, slowest_median_ms, spawn_world
from .step import StampSteps

DIGITS = 1797  # images in the exported digits
IMAGE_SIZE = 32  # the digits (8x8) are resized to IMAGE_SIZE x IMAGE_SIZE as they are decoded
WARMUP = 2  # untimed steps at the start of every trainer run
LOADER_WORKERS = (0, 1, 2)
ARRAYS = "arrays (decoded, float32)"
FOLDER0 = "imagefolder, 0 workers"
FOLDER2 = "imagefolder, 2 workers"
DEFAULTS = ["model.name=cnn", "model.norm=none", "train.dtype=float32", "train.device=cpu",
            "train.checkpoint_every=0", "data.augment=flip_crop"]
RSS_TARGET = 1.25  # largest / smallest dataset: peak RSS within this factor
TIME_TARGET = (1.3, 2.0)  # time to the end of the first step within 1.3 x + 2 s


def _config(out_dir: Path | str, batch: int, *overrides: str) -> Config:
    return load_config(None, [*DEFAULTS, f"train.global_batch_size={batch}", f"train.out_dir={out_dir}",
                              *overrides])


def _folder(path: Path, workers: int = 0) -> list[str]:
    return ["data.name=imagefolder", f"data.path={path}", f"data.image_size=[{IMAGE_SIZE}, {IMAGE_SIZE}]",
            f"data.workers={workers}"]


def _arrays(path: Path) -> list[str]:
    return ["data.name=arrays", f"data.path={path}"]


def _env() -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


# ---------------------------------------------------------------------- the data sets

def write_digits(root: Path) -> tuple[Path, Path]:
    """The digits as an image folder (root/images) and, decoded and resized by the image folder's own reader,
    as float32 arrays (root/decoded: x.npy (N, 3, 32, 32), y.npy): the same samples at the same indices."""
    images, decoded = root / "images", root / "decoded"
    export_digits(images)
    source = build_data(_config(root / "unused", 1, *_folder(images)))
    x, y = source.fetch(np.arange(len(source)))
    decoded.mkdir()
    np.save(decoded / "x.npy", x.numpy())
    np.save(decoded / "y.npy", y.numpy().astype(np.int64))
    return images, decoded


def write_random_arrays(directory: Path, samples: int, chunk: int = 8192) -> int:
    """``samples`` random uint8 images 3x32x32 (x.npy) and int64 labels 0..9 (y.npy) under ``directory``, written a
    chunk at a time (the map is closed after each, so the writer never holds the file); x.npy's size in bytes."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng([samples, 7])
    path = directory / "x.npy"
    shape = (samples, 3, 32, 32)
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()  # the header and the size
    for start in range(0, samples, chunk):
        stop = min(start + chunk, samples)
        out = np.lib.format.open_memmap(path, mode="r+")
        out[start:stop] = rng.integers(0, 256, size=(stop - start, *shape[1:]), dtype=np.uint8)
        out.flush()
        del out
    np.save(directory / "y.npy", rng.integers(0, 10, samples).astype(np.int64))
    return path.stat().st_size


# ---------------------------------------------------------------------- 1. the loader alone

def loader_throughput(images: Path, batch: int, steps: int, rounds: int) -> list[dict[str, Any]]:
    """Per data.workers: samples/s of iterating steps [0, steps + 1) (the first step not counted) and the time to
    the first batch, medians over rounds."""
    cfg = _config("unused", batch, *_folder(images))
    source = build_data(cfg)
    cpu = torch.device("cpu")
    first: dict[str, list[float]] = {}

    def variant(workers: int):
        def once() -> list[float]:
            batches = GlobalBatches(source, batch, cfg.seed, 0, 1, workers, cfg.data.prefetch)
            try:
                start = time.perf_counter()
                stamps = [time.perf_counter() for _ in batches.steps(0, steps + 1, cpu, 1)]
            finally:
                batches.close()
            first.setdefault(str(workers), []).append(stamps[0] - start)
            return [(stamps[-1] - stamps[0]) / steps]  # seconds per step in the steady state
        return once

    times = interleaved({str(w): variant(w) for w in LOADER_WORKERS}, rounds)
    ms = slowest_median_ms([times])
    return [{"workers": w, "samples_per_s": 1e3 * batch / ms[str(w)], "ms_per_batch": ms[str(w)],
             "first_batch_ms": 1e3 * statistics.median(first[str(w)]),
             "speedup_vs_0": statistics.median(1 / r for r in paired_ratios([times], str(w), "0"))}
            for w in LOADER_WORKERS]


# ---------------------------------------------------------------------- 2. the trainer: disk vs memory

def step_times(images: Path, decoded: Path, batch: int, steps: int, rounds: int, out_root: Path
               ) -> tuple[list[dict[str, Any]], bool]:
    """Per variant: median ms per step of the trainer and the ratio to the arrays variant; and whether every
    variant computed the same losses in every round."""
    variants = {ARRAYS: _arrays(decoded), FOLDER0: _folder(images, 0), FOLDER2: _folder(images, 2)}
    losses: dict[str, list[list[float]]] = {name: [] for name in variants}

    def variant(name: str):
        def once() -> list[float]:
            cfg = _config(out_root / f"run{len(losses[name])}", batch, *variants[name],
                          f"train.steps={WARMUP + steps + 1}")
            clock = StepClock()
            result = Trainer(cfg, _env(), hooks=[StampSteps(clock)], console=False).run()
            losses[name].append(result.losses)
            return clock.periods(WARMUP)
        return once

    times = interleaved({name: variant(name) for name in variants}, rounds)
    ms = slowest_median_ms([times])
    rows = [{"data": name, "ms_per_step": ms[name],
             "vs_arrays": statistics.median(paired_ratios([times], name, ARRAYS))} for name in variants]
    same = all(losses[name] == losses[ARRAYS] for name in variants)
    return rows, same


# ---------------------------------------------------------------------- 3. start-up and memory vs size

class _FirstStep(Hook):
    def __init__(self) -> None:
        self.end: float | None = None

    def on_step_end(self, trainer: Trainer, step: int, result: Any) -> None:
        if self.end is None:
            self.end = time.time()


def child(spec: str) -> None:
    """In a fresh process: train 2 steps on the arrays at spec["path"]; print JSON with the seconds from
    spec["started"] (the parent's clock just before it started this process) to the end of the first step, to
    the end of the imports, and the peak RSS in KiB."""
    args = json.loads(spec)
    imported = time.time()
    torch.set_num_threads(1)
    hook = _FirstStep()
    cfg = _config(args["out_dir"], args["batch"], *_arrays(Path(args["path"])), "train.steps=2")
    trainer = Trainer(cfg, _env(), hooks=[hook], console=False)
    trainer.run()
    read = trainer.parts.batches.dataset.bytes_read  # (the arrays source counts what its preads returned)
    print(json.dumps({"first_step_s": hook.end - args["started"], "import_s": imported - args["started"],
                      "maxrss_kib": peak_rss_kib(), "bytes_per_sample": read / (2 * args["batch"])}), flush=True)


def peak_rss_kib() -> int:
    """Peak RSS in KiB of this process's own address space (VmHWM). ru_maxrss keeps, over an exec, the RSS of the
    address space it replaced: the parent's, when subprocess starts the child by vfork."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _run_child(path: Path, batch: int, out_dir: Path) -> dict[str, float]:
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    spec = {"path": str(path), "batch": batch, "out_dir": str(out_dir), "started": time.time()}
    code = "import sys; from disttrain.bench.data import child; child(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunFailure(f"bench data: the process training on {path} failed ({done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_scaling(sizes: tuple[int, ...], batch: int, rounds: int, root: Path
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per size: median time to the end of the first step and peak RSS of a fresh process; and the ratios of the
    largest size to the smallest (medians of the per-round ratios) against the targets."""
    paths, nbytes = {}, {}
    for n in sizes:
        paths[n] = root / f"arrays{n}"
        nbytes[n] = write_random_arrays(paths[n], n)
    reports: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}

    def variant(n: int):
        def once() -> list[float]:
            report = _run_child(paths[n], batch, root / f"out{n}")
            reports[n].append(report)
            return [report["first_step_s"]]
        return once

    interleaved({str(n): variant(n) for n in sizes}, rounds)
    rows = [{"samples": n, "x_bytes": nbytes[n],
             "first_step_s": statistics.median(r["first_step_s"] for r in reports[n]),
             "import_s": statistics.median(r["import_s"] for r in reports[n]),
             "peak_rss_kib": statistics.median(r["maxrss_kib"] for r in reports[n]),
             "bytes_per_sample": statistics.median(r["bytes_per_sample"] for r in reports[n])} for n in sizes]
    small, big = min(sizes), max(sizes)
    pairs = list(zip(reports[small], reports[big]))
    rss = statistics.median(b["maxrss_kib"] / a["maxrss_kib"] for a, b in pairs)
    seconds = statistics.median(b["first_step_s"] / a["first_step_s"] for a, b in pairs)
    t_small, t_big = rows[sizes.index(small)]["first_step_s"], rows[sizes.index(big)]["first_step_s"]
    limit = TIME_TARGET[0] * t_small + TIME_TARGET[1]
    ratios = {"small": small, "big": big, "rss_ratio": rss, "time_ratio": seconds, "rss_target": RSS_TARGET,
              "rss_met": rss <= RSS_TARGET, "time_limit_s": limit, "time_met": t_big <= limit}
    return rows, ratios


# ---------------------------------------------------------------------- the command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps per run of the loader and of the trainer (default 20)")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="runs of each variant, alternating (default 5)")
    parser.add_argument("--sizes", type=positive_ints, default=(10000, 300000),
                        help="samples of the arrays datasets of part 3, comma-separated (default 10000,300000)")
    parser.add_argument("--batch", type=positive_int, default=128, help="global batch size (default 128)")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    """One process (no process group: nothing here is per rank); ``run_world`` is not used."""
    if args.batch > min(DIGITS, *args.sizes):
        raise ConfigError(f"bench data: --batch {args.batch} exceeds the smallest dataset "
                          f"({min(DIGITS, *args.sizes)} samples)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="disttrain-bench-data-"))
    try:
        images, decoded = write_digits(root)
        loader = loader_throughput(images, args.batch, args.steps, args.rounds)
        steps, same = step_times(images, decoded, args.batch, args.steps, args.rounds, root / "runs")
        shutil.rmtree(root / "runs", ignore_errors=True)
        sizes, ratios = size_scaling(tuple(sorted(set(args.sizes))), args.batch, args.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        torch.set_num_threads(threads)
    setting = {"steps": args.steps, "warmup": WARMUP, "rounds": args.rounds, "sizes": list(args.sizes),
               "batch": args.batch, "image_size": [IMAGE_SIZE, IMAGE_SIZE], "images": DIGITS,
               "config": DEFAULTS, "threads": 1}
    return {"benchmark": "data", "machine": {**machine(), "backend": "none (one process)"}, "setting": setting,
            "rows": {"loader": loader, "step": steps, "sizes": sizes},
            "same_losses": same, "size_ratios": ratios}


def format_table(result: dict[str, Any]) -> str:
    st, rows, ratios = result["setting"], result["rows"], result["size_ratios"]
    size = f"{st['image_size'][0]}x{st['image_size'][1]}"
    lines = [f"1. Loader alone: {st['images']} digit PNGs decoded and resized to {size}, flip_crop, batch "
             f"{st['batch']}, {st['steps']} steps after the first, median of {st['rounds']} rounds", ""]
    lines.append(markdown_table(["data.workers", "samples/s", "ms/batch", "first batch ms", "speed-up vs 0"], [
        [str(r["workers"]), f"{r['samples_per_s']:.0f}", f"{r['ms_per_batch']:.2f}", f"{r['first_batch_ms']:.1f}",
         f"{r['speedup_vs_0']:.2f}x"] for r in rows["loader"]]))
    lines += ["", f"2. Trainer step, cnn float32, W=1, batch {st['batch']} of 3x{size}, flip_crop, {st['steps']} "
              f"steps after {st['warmup']}, median of {st['rounds']} rounds "
              f"(same losses in every variant: {'yes' if result['same_losses'] else 'NO'})", ""]
    lines.append(markdown_table(["data", "ms/step", "vs arrays"], [
        [r["data"], f"{r['ms_per_step']:.2f}", f"{r['vs_arrays']:.3f}"] for r in rows["step"]]))
    lines += ["", f"3. Fresh process training 2 steps on arrays of uint8 3x32x32, median of {st['rounds']} rounds",
              ""]
    lines.append(markdown_table(["samples", "x.npy MiB", "start to end of step 1 s", "of which imports s",
                                 "peak RSS MiB", "bytes read per sample"], [
        [str(r["samples"]), f"{r['x_bytes'] / 2**20:.1f}", f"{r['first_step_s']:.2f}", f"{r['import_s']:.2f}",
         f"{r['peak_rss_kib'] / 1024:.1f}", f"{r['bytes_per_sample']:.0f}"] for r in rows["sizes"]]))
    met = {True: "met", False: "NOT met"}
    lines += ["", f"{ratios['big']} / {ratios['small']} samples: peak RSS x{ratios['rss_ratio']:.3f} (target <= "
              f"{ratios['rss_target']}x: {met[ratios['rss_met']]}), time x{ratios['time_ratio']:.3f} (target <= "
              f"{TIME_TARGET[0]}x + {TIME_TARGET[1]:g} s = {ratios['time_limit_s']:.2f} s: {met[ratios['time_met']]})"]
    return "\n".join(lines)

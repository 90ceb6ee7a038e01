"""Host syncs per training step: the trainer's reads of device values back to the host, counted step by step.

    disttrain bench syncs [--world-size 2] [--steps 4] [--device cpu|cuda] [--set KEY=VALUE ...] [--json]

Every read of a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``,
``operator.index(t)``) makes a GPU's host wait until the stream has computed it: the host stops queueing work and
the GPU then idles until the next kernel arrives. The rule (docs/performance-gpu.md): at most one such read per
training step, the step's own (run/step.py ``read_back``: the gradient norm, fp16's overflow flag and the stop
request together), metrics flushes and checkpoints aside. This benchmark runs the trainer in a few settings (each
strategy, fp16, clipping, per-sample dropout and augmentation) and counts, from the second step on:

- ``reads``: those Python calls on tensors, by wrapping the six methods of ``torch.Tensor`` (on any device, so
  the count on this CPU is the count a GPU would see from Python);
- ``cuda_syncs`` (``--device cuda`` only): the synchronizing CUDA operations that torch reports with
  ``torch.cuda.set_sync_debug_mode("warn")``, which also sees syncs made inside torch's C++ code.

With ``--device cuda`` the settings run in this process, on one GPU (no process group; under torchrun, the
group torchrun made). The entry point for a GPU check: ``python -m disttrain.bench syncs --device cuda --json``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..checkpoint.writer import Checkpointer
from ..config.parse import config_from_dict, load_config
from ..observe.metrics import StepMetrics
from ..parallel.env import distributed
from ..run.train import Hook, Trainer
from .common import RunWorld, machine, markdown_table, positive_int, spawn_world

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
# Not the step's: metrics reduce many steps in one flush, checkpoints are written every N steps.
EXEMPT = ((StepMetrics, "flush"), (Checkpointer, "save"))
BASE = ["model.name=cnn", "model.hidden=8", "train.global_batch_size=12", "train.dtype=float32",
        "train.checkpoint_every=0", "train.tensorboard=false", "data.num_samples=48"]
SETTINGS = {
    "ddp": [],
    "allreduce": ["comm.impl=allreduce"],
    "fsdp": ["comm.impl=fsdp"],
    "fp16": ["train.precision=fp16"],
    "clip norm": ["clip.mode=norm", "clip.max_norm=0.5"],
    "dropout, augmentation": ["model.dropout=0.2", "data.augment=flip_crop"],
}


class HostSyncCounter(Hook):
    """Counts host reads of tensors per step, from step ``first`` on, until the run ends (see the module docstring).

    ``reads[i]`` / ``cuda_syncs[i]``: the counts of the i-th counted step, from its start to the next one's (the
    stop hook's decision after a step belongs to it)."""

    def __init__(self, first: int = 1):
        self.first = first
        self.reads: list[int] = []
        self.cuda_syncs: list[int] = []
        self._stack: contextlib.ExitStack | None = None
        self._paused = 0
        self._caught: list[warnings.WarningMessage] = []
        self._cuda = False

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step < self.first:
            return
        if self._stack is None:
            self._cuda = trainer.env.device.type == "cuda"
            self._stack = self._install()
        else:
            self._close_step()
        self.reads.append(0)
        self.cuda_syncs.append(0)

    def on_end(self, trainer: Trainer) -> None:
        if self._stack is not None:
            self._close_step()
            self._stack.close()
            self._stack = None

    def _close_step(self) -> None:
        if self._cuda:
            self.cuda_syncs[-1] += sum("synchroniz" in str(w.message) for w in self._caught)
            self._caught.clear()

    def _install(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for name in READS:
            stack.enter_context(_patched(torch.Tensor, name, self._counting(getattr(torch.Tensor, name))))
        for owner, name in EXEMPT:
            stack.enter_context(_patched(owner, name, self._exempt(getattr(owner, name))))
        if self._cuda:
            self._caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, 0)
        return stack

    def _counting(self, method: Any) -> Any:
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self._paused:
                self.reads[-1] += 1
            self._paused += 1  # a read made inside another (tolist's own __index__) is the same read
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._paused -= 1
        return wrapper

    def _exempt(self, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._paused += 1
            if self._cuda:
                torch.cuda.set_sync_debug_mode(0)
            try:
                return method(*args, **kwargs)
            finally:
                self._paused -= 1
                if self._cuda and not self._paused:
                    torch.cuda.set_sync_debug_mode("warn")
        return wrapper


@contextlib.contextmanager
def _patched(owner: type, name: str, value: Any) -> Iterator[None]:
    had = name in vars(owner)
    previous = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


def count_syncs(cfg_dict: dict[str, Any], steps: int) -> dict[str, list[int]]:
    """On every rank: train ``cfg_dict`` for ``steps`` + 1 steps and count the host syncs of steps 1.. (step 0
    builds lazily and is not counted). Also the entry point for a GPU check (train.device=cuda)."""
    cfg = config_from_dict({**cfg_dict, "train": {**cfg_dict["train"], "steps": steps + 1}})
    counter = HostSyncCounter(first=1)
    from ..run.stop import GracefulStop  # the stop request's read is part of the step: counted with it

    with distributed(cfg.train.device, cfg.comm.timeout_s) as env:
        Trainer(cfg, env, hooks=[GracefulStop(), counter], console=False).run()
    return {"reads": counter.reads, "cuda_syncs": counter.cuda_syncs}


def _count_all(cfg_dicts: list[dict[str, Any]], steps: int) -> list[dict[str, list[int]]]:
    """On every rank: :func:`count_syncs` of each config in turn (one launch of the ranks for all of them)."""
    return [count_syncs(cfg_dict, steps) for cfg_dict in cfg_dicts]


def _on_this_process(world_size: int, fn: Any, *args: Any) -> list[Any]:
    return [fn(*args)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=positive_int, default=2, help="ranks on the CPU (default 2)")
    parser.add_argument("--steps", type=positive_int, default=4, help="counted steps per setting (default 4)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU, in this process, also counting torch's own sync reports")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"change every setting's config (default: {' '.join(BASE)})")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    rows = []
    world_size = 1 if args.device == "cuda" else args.world_size
    run_world = _on_this_process if args.device == "cuda" else run_world
    with tempfile.TemporaryDirectory(prefix="disttrain-syncs-") as out_dir:
        cfgs = [load_config(None, [*BASE, f"train.device={args.device}", *settings, *args.overrides,
                                   f"train.out_dir={out_dir}/{i}"]).to_dict()
                for i, settings in enumerate(SETTINGS.values())]
        per_rank = run_world(world_size, _count_all, cfgs, args.steps)
        for i, (name, settings) in enumerate(SETTINGS.items()):
            counts = [r[i] for r in per_rank]
            rows.append({"setting": name, "config": settings,
                         "reads_per_step": [max(c["reads"][k] for c in counts) for k in range(args.steps)],
                         "cuda_syncs_per_step": [max(c["cuda_syncs"][k] for c in counts) for k in range(args.steps)]})
    return {"benchmark": "syncs", "machine": {**machine(), "device": args.device},
            "setting": {"config": BASE, "world_size": world_size, "steps": args.steps}, "rows": rows,
            "max_reads_per_step": max(max(r["reads_per_step"]) for r in rows),
            "max_cuda_syncs_per_step": max(max(r["cuda_syncs_per_step"]) for r in rows)}


def format_table(result: dict[str, Any]) -> str:
    cuda = result["machine"]["device"] == "cuda"
    header = ["setting", "host reads per step (max over ranks)"] + (["CUDA syncs per step"] if cuda else [])
    return markdown_table(header, [[r["setting"], " ".join(map(str, r["reads_per_step"]))]
                                   + ([" ".join(map(str, r["cuda_syncs_per_step"]))] if cuda else [])
                                   for r in result["rows"]])


__all__ = ["HostSyncCounter", "count_syncs", "READS"]

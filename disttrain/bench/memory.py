"""Benchmark: the memory each rank holds under ddp and fsdp, with and without activation recomputation.

    disttrain bench memory [--models cnn,resnet] [--world-sizes 1,2,4] [--batch 64] [--steps 5] [--json]

For every model, world size W, strategy (ddp, fsdp) and recompute (off, on), a run of the trainer's parts
(build.build, step.train_step) on every rank of a W-process gloo group, float32, AdamW, one intra-op thread per
rank. Per rank, measured from the tensors themselves:
- ``param_bytes``, ``grad_bytes``, ``optimizer_bytes``: what the rank holds after a step (fsdp: its shards, the
  local part of each DTensor; ddp: whole copies; DDP's gradient buckets, another copy of the gradients, are not
  counted);
- ``activation_bytes``: the tensors autograd keeps for backward during one forward of this rank's slice
  (``torch.autograd.graph.saved_tensors_hooks``), each storage once, parameters excluded; with recompute, each
  block's input, which the checkpoint keeps, is among them;
- ``peak_rss``: the process's peak resident set size (ru_maxrss: the torch runtime included, so it moves less);
- ``step_ms``: median time of a training step; ``comm_bytes``: the payload of every collective of one step
  (all_reduce: the tensor; all_gather: the gathered result; reduce_scatter: its input), as in nccl-tests' algbw;
  a ring moves about 2(W-1)/W of that per rank for an all_reduce and (W-1)/W for the other two.
The largest rank is reported (ranks differ by a padded shard at most). At W = 1 both strategies are one process
holding everything (no wrapper, nothing communicated). A benchmark prints numbers; nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..run.build import build
from ..config.parse import load_config
from ..parallel.env import distributed
from ..randomness import sample_keys
from ..run.step import summed_loss, train_step
from .common import RunWorld, machine, markdown_table, positive_int, positive_ints, spawn_world

MODELS = {
    "cnn": ["model.name=cnn", "model.hidden=64", "model.norm=syncbn"],
    "resnet": ["model.name=examples.resnet:resnet", "model.norm=syncbn", "model.kwargs={width: 16, blocks: [2, 2]}"],
}
IMPLS = ("ddp", "fsdp")


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
    return local.numel() * local.element_size()


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds."""
    params = list(module.parameters())
    return {"param_bytes": sum(_local_bytes(p) for p in params),
            "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                   if isinstance(v, torch.Tensor))}


def _is_parameter(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad  # the only leaves that require grad are parameters


def saved_activation_bytes(module: nn.Module, micro_batch: tuple, loss: str = "cross_entropy",
                           loss_divisor: int = 1) -> int:
    """Bytes autograd saves for backward in one forward of ``micro_batch`` (x, y[, keys]) through ``module``
    (each storage once, parameters excluded); then the backward runs, so the graph is freed and every rank's
    collectives complete. Leaves gradients behind: zero them before the next step."""
    x, y, *keys = micro_batch
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_parameter(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with sample_keys(keys[0]) if keys else contextlib.nullcontext():
            out = module(x)
        total = summed_loss(loss, out, y) / loss_divisor
    total.backward()
    return sum(storages.values())


_COLLECTIVES = {  # name -> the bytes of its payload from (args, kwargs)
    "all_reduce": lambda a, k: _nbytes(a[0] if a else k["tensor"]),
    "all_gather": lambda a, k: sum(_nbytes(t) for t in (a[0] if a else k["tensor_list"])),
    "all_gather_single": lambda a, k: _nbytes(a[0] if a else k["output_tensor"]),
    "all_gather_into_tensor": lambda a, k: _nbytes(a[0] if a else k["output_tensor"]),
    "reduce_scatter_single": lambda a, k: _nbytes(a[1] if len(a) > 1 else k["input"]),
    "reduce_scatter_tensor": lambda a, k: _nbytes(a[1] if len(a) > 1 else k["input"]),
    "broadcast": lambda a, k: _nbytes(a[0] if a else k["tensor"]),
}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def counted_collectives(counts: list[int]) -> Iterator[None]:
    """Append the payload of every torch.distributed collective called inside (by module attribute, as parallel/sync.py,
    syncbn.py and FSDP2 call them) to ``counts``."""
    real = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            counts.append(_COLLECTIVES[name](args, kwargs))
            return real[name](*args, **kwargs)
        return call
    for name in _COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def measure(overrides: list[str], steps: int) -> dict[str, Any]:
    """On every rank: build the parts, measure the activations of one forward, then time ``steps`` steps."""
    torch.set_num_threads(1)
    cfg = load_config(None, ["optim.name=adamw", *overrides, "train.device=cpu", "train.checkpoint_every=0"])
    with distributed("cpu") as env:
        parts = build(cfg, env)
        sync, optimizer, batches = parts.sync, parts.optimizer, parts.batches
        sync.module.train()
        micro = batches.keyed_micro_batches(0, env.device, 1)
        activation = saved_activation_bytes(sync.module, micro[0], cfg.train.loss, sync.loss_divisor)
        optimizer.zero_grad(set_to_none=True)
        times, comm = [], []
        for step in range(steps + 1):  # step 0 warms up (and creates the optimizer state)
            counts: list[int] = []
            micro = batches.keyed_micro_batches(step, env.device, 1)
            start = time.perf_counter()
            with counted_collectives(counts):
                train_step(sync, optimizer, micro, cfg.clip, step, cfg.train.loss)
            if step > 0:
                times.append(1e3 * (time.perf_counter() - start))
                comm.append(sum(counts))
        held = state_bytes(sync.module, optimizer)
    return {**held, "activation_bytes": activation, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024, "step_ms": statistics.median(times), "comm_bytes": max(comm)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="cnn,resnet", help="comma-separated: cnn, resnet (default both)")
    parser.add_argument("--world-sizes", type=positive_ints, default=(1, 2, 4), help="default 1,2,4")
    parser.add_argument("--batch", type=positive_int, default=64, help="global batch size (default 64)")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per setting (default 5)")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    rows = []
    for model in models:
        for w in args.world_sizes:
            for impl in IMPLS:
                for recompute in (False, True):
                    overrides = [*MODELS[model], f"comm.impl={impl}", f"model.recompute={str(recompute).lower()}",
                                 f"train.global_batch_size={args.batch}", f"data.num_samples={args.batch * 4}"]
                    per_rank = run_world(w, measure, overrides, args.steps)
                    worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
                    rows.append({"model": model, "impl": impl, "world_size": w, "recompute": recompute, **worst})
    return {"benchmark": "memory", "machine": machine(), "batch": args.batch, "rows": rows,
            "ratios": ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and W: fsdp's state bytes over ddp's (target <= 1/W + 5 %), and saved activations without
    recompute over with it (target >= 2)."""
    def find(model, w, impl, recompute):
        return next((r for r in rows if (r["model"], r["world_size"], r["impl"], r["recompute"]) ==
                     (model, w, impl, recompute)), None)

    def state(r):
        return r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
    out = []
    for model, w in dict.fromkeys((r["model"], r["world_size"]) for r in rows):
        ddp, fsdp = find(model, w, "ddp", False), find(model, w, "fsdp", False)
        plain, recomputed = find(model, w, "ddp", False), find(model, w, "ddp", True)
        out.append({"model": model, "world_size": w,
                    "fsdp_over_ddp_state": state(fsdp) / state(ddp) if ddp and fsdp else None,
                    "activation_cut": plain["activation_bytes"] / recomputed["activation_bytes"]
                    if plain and recomputed else None})
    return out


def format_table(result: dict[str, Any]) -> str:
    kib = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    rows = [[r["model"], r["impl"], str(r["world_size"]), "yes" if r["recompute"] else "no", kib(r["param_bytes"]),
             kib(r["grad_bytes"]), kib(r["optimizer_bytes"]), kib(r["activation_bytes"]),
             f"{r['peak_rss'] / 2**20:.0f}", f"{r['step_ms']:.1f}", kib(r["comm_bytes"])] for r in result["rows"]]
    table = markdown_table(["model", "impl", "W", "recompute", "params KiB", "grads KiB", "optimizer KiB",
                            "activations KiB", "peak RSS MiB", "step ms", "comm KiB/step"], rows)
    lines = [f"Per rank (the largest), global batch {result['batch']}, float32, AdamW, gloo:", "", table, ""]
    for r in result["ratios"]:
        lines.append(f"{r['model']} W={r['world_size']}: fsdp/ddp state bytes {r['fsdp_over_ddp_state']:.3f} "
                     f"(1/W = {1 / r['world_size']:.3f}), activations without/with recompute "
                     f"{r['activation_cut']:.2f}x")
    return "\n".join(lines)

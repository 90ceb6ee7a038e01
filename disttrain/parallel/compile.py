"""``train.compile``: torch.compile per block, the units that fsdp shards and recomputation replays (blocks.py).

As torchtitan compiles each transformer block rather than the whole model: the blocks of a model are few and
often alike (one compilation serves many), the strategy's hooks and collectives stay outside the compiled code,
and a graph break costs only its own block. The order in build.py is: blocks recomputed (if asked), compiled, then
wrapped by the strategy (DDP, fsdp). Two choices differ from torchtitan's:

- **Compiled inside the recomputed segment**, not around it: the segment's checkpoint carries context functions
  in Python (per-sample dropout replays its call counts, batch norm gets its running statistics back), which
  dynamo does not trace. The replay runs the same compiled code, so recomputation stays bitwise.
- **Beneath the strategy's hooks.** Each block's forward is compiled, not the module's call, so DDP's hooks run
  eagerly around it. Under fsdp each layer's forward is compiled on its own (:func:`compiled_per_layer`): FSDP2
  puts its all_gather hooks on every layer of a block and marks them not to be traced, so inside a compiled
  segment they broke its graph and dynamo ran the whole segment eagerly (0 graphs compiled, measured).

Layers marked ``compile_eagerly`` run eagerly between the compiled parts of their block (:func:`compiled`):
SyncBatchNorm (compiled inside a segment at W=2 it broke the graph: 2 graphs, 1 break, at the host read of its
sample count on the CPU; its collective on CUDA) and per-sample dropout (its mask is drawn from a context
variable, randomness.py). A graph break inside a segment's loop would make dynamo run the whole segment eagerly
and, with recomputation, the forward and its replay save different tensors (a CheckpointError).

The result is the same computation, rounded differently where inductor fuses operations: float64 runs with
compile match one device to 1e-10 (tests/test_compile.py). ``torch._dynamo.config.optimize_ddp`` is set to
"ddp_optimizer", torch's recommendation for a compiled model under DDP (it splits a graph at DDP's bucket
boundaries, so communication still overlaps backward; it acts where dynamo traces the DDP module itself).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, or None if there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def backend() -> str:
    """torch.compile's backend: inductor, unless DISTTRAIN_COMPILE_BACKEND names another (aot_eager traces and
    partitions forward and backward as inductor does, without generating code: a quick check of a model)."""
    return os.environ.get("DISTTRAIN_COMPILE_BACKEND", "inductor")


def _eager(module: nn.Module) -> bool:
    return any(getattr(m, "compile_eagerly", False) for m in module.modules())


def compiled_per_layer(run: Callable[..., torch.Tensor], modules: list[nn.Module]) -> Callable[..., torch.Tensor]:
    """A :data:`~.blocks.BlockWrap` for fsdp: each layer's ``forward`` of a segment compiled on its own (a block's
    own module: its forward), beneath the module hooks that fsdp adds later. FSDP2's hooks (the all_gather before
    a layer runs) are marked not to be traced: called inside compiled code they break its graph, and a break in a
    segment's loop runs the whole segment eagerly. Per layer, they run eagerly around compiled code."""
    layers = getattr(run, "layers", None)
    if layers is None:  # a block's own module: fsdp's hooks are on it, around its forward
        return compiled(run, modules)
    return _per_layer(run, layers)


def _per_layer(run: Callable[..., torch.Tensor], layers: list[nn.Module]) -> Callable[..., torch.Tensor]:
    """``run`` unchanged, with the forward of each of ``layers`` that is not marked ``compile_eagerly`` compiled
    (a layer that holds a marked one: each of its own layers, recursively)."""
    for layer in layers:
        if not _eager(layer):
            layer.forward = torch.compile(layer.forward, backend=backend())
        elif not getattr(layer, "compile_eagerly", False):
            _per_layer(run, list(layer.children()))
    return run


def compiled(run: Callable[..., torch.Tensor], modules: list[nn.Module]) -> Callable[..., torch.Tensor]:
    """A :data:`~.blocks.BlockWrap`: ``run`` (a block's forward) compiled by torch.compile (inductor, on first call).

    A segment of an nn.Sequential that holds a layer marked ``compile_eagerly`` (SyncBatchNorm's collective,
    per-sample dropout) is compiled in parts, the marked layers eager between them: a graph break inside the
    segment's loop would make dynamo run the whole segment eagerly, its recomputation too, and the forward and its
    replay would then save different tensors."""
    layers = getattr(run, "layers", None)
    if not any(_eager(m) for m in modules):
        return torch.compile(run, backend=backend())
    if layers is None:  # a block's own forward, which cannot be cut: its layers are compiled one by one
        return _per_layer(run, modules)
    parts: list[Callable[..., torch.Tensor]] = []
    pending: list[nn.Module] = []
    for layer in [*layers, None]:
        if layer is not None and not _eager(layer):
            pending.append(layer)
            continue
        if pending:
            parts.append(torch.compile(nn.Sequential(*pending), backend=backend()))
            pending = []
        if layer is not None:
            parts.append(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for part in parts:
            x = part(x)
        return x
    return forward


def check_compile(device: torch.device) -> None:
    """ConfigError (one line) where ``train.compile`` cannot work: inductor on the CPU needs a C++ compiler."""
    if device.type == "cpu" and backend() == "inductor" and cpp_compiler() is None:
        raise ConfigError("train.compile=true on the CPU needs a C++ compiler for torch.compile (none of $CXX, g++, "
                          "c++, clang++ found): install one, or set train.compile=false")


def prepare_compile(device: torch.device) -> None:
    """Before the strategy wraps a compiled model: DDP's graph splitting, as torch recommends."""
    check_compile(device)
    torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    # Layers of one class share their forward's code, and dynamo keeps 8 compilations per code by default (one per
    # shape of the layer): a model with more conv shapes than that would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def graph_breaks() -> int:
    """Graph breaks dynamo counted in this process so far (the compiled blocks' parts that run eagerly)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


__all__ = ["cpp_compiler", "backend", "compiled", "compiled_per_layer", "check_compile", "prepare_compile",
           "graph_breaks"]

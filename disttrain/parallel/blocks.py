"""A model's blocks: the units that sharded training gathers together and activation recomputation replays.

**The policy.** A model may name its blocks itself with a method ``disttrain_blocks(self) -> list[nn.Module]``
(each module one block). Otherwise every ``nn.Sequential`` and ``nn.ModuleList`` in the model, outermost first,
is cut into blocks:

- in an ``nn.Sequential``, a block starts at each element that holds parameters and is not a normalisation
  layer; normalisation layers and parameter-free elements (activations, pooling, dropout) join the block before
  them, so conv-BN-ReLU is one block (parameter-free elements before the first start join the first block);
- in an ``nn.ModuleList``, each element that holds parameters is a block;
- containers inside a block belong to it (a residual block's shortcut is not cut out of it).

A model without such containers has one block per direct child that holds parameters. Whatever no block holds
(a classifier head next to the containers) belongs to the root. For disttrain's CNN that is conv-norm-ReLU
twice (the head is the root's); for the example ResNet the stem and each residual block.

**Recomputation** (``model.recompute``): each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant),
so backward keeps only the block's input and recomputes the rest. The replay must compute exactly what the forward
computed: per-sample dropout draws the same masks (randomness.replay_context) and batch norm layers, which update
their running statistics in every training forward, get them back after the replay (they would be updated twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from ..randomness import replay_context


@dataclass
class Block:
    """One block: ``modules``, consecutive elements [start, stop) of ``container`` (an nn.Sequential), or one
    module on its own (``container`` None)."""

    modules: list[nn.Module]
    container: nn.Sequential | None = None
    start: int = 0
    stop: int = 0


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm))


def _cut_sequential(seq: nn.Sequential) -> list[Block]:
    layers = list(seq)
    starts = [i for i, m in enumerate(layers) if _has_params(m) and not _is_norm(m)]
    if not starts:  # only norm layers and parameter-free ones: one block if it holds anything to shard
        return [Block(layers, seq, 0, len(layers))] if _has_params(seq) else []
    starts[0] = 0
    bounds = [*starts, len(layers)]
    return [Block(layers[a:b], seq, a, b) for a, b in zip(bounds, bounds[1:])]


def _visit(module: nn.Module) -> list[Block]:
    found: list[Block] = []
    for child in module.children():
        if isinstance(child, nn.Sequential):
            found += _cut_sequential(child)
        elif isinstance(child, nn.ModuleList):
            found += [Block([m]) for m in child if _has_params(m)]
        else:
            found += _visit(child)
    return found


def model_blocks(model: nn.Module) -> list[Block]:
    """The blocks of ``model`` per the policy in the module docstring, in forward order of the containers."""
    own = getattr(model, "disttrain_blocks", None)
    if callable(own):
        return [Block([m]) for m in own()]
    if isinstance(model, nn.Sequential):
        return _cut_sequential(model)
    found = _visit(model)
    if found:
        return found
    return [Block([m]) for m in model.children() if _has_params(m)]


# --------------------------------------------------------------------------- recomputation

@contextlib.contextmanager
def _restored_norm_statistics(modules: list[nn.Module]) -> Iterator[None]:
    """Put the running statistics of the batch norm layers in ``modules`` back after the block is replayed."""
    norms = [m for block in modules for m in block.modules() if isinstance(m, _NormBase)]
    saved = [{name: b.clone() for name, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


def recomputed(run: Callable[..., torch.Tensor], modules: list[nn.Module]) -> Callable[..., torch.Tensor]:
    """A :data:`BlockWrap`: ``run`` (the forward of ``modules``) under non-reentrant checkpointing, recomputed in
    backward instead of keeping its activations."""
    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        # Called at forward time: replay_context snapshots the per-sample dropout call counts so far.
        forward_ctx, replay_ctx = replay_context()
        return forward_ctx, _entered(replay_ctx, _restored_norm_statistics(modules))

    def forward(*args, **kwargs):
        return checkpoint(run, *args, use_reentrant=False, context_fn=contexts, **kwargs)
    return forward


@contextlib.contextmanager
def _entered(*managers: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


# A change of a block's forward: (its forward, its modules) -> the new forward (recomputation, compilation).
BlockWrap = Callable[[Callable[..., torch.Tensor], list[nn.Module]], Callable[..., torch.Tensor]]


def _sequential_forward(seq: nn.Sequential, blocks: list[Block], wraps: tuple[BlockWrap, ...]
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``seq``'s forward with each of ``blocks`` (segments of it) run through ``wraps``, innermost first."""
    layers = list(seq)
    runs = []
    for block in sorted(blocks, key=lambda b: b.start):
        def run(x, _layers=layers[block.start:block.stop]):
            for layer in _layers:
                x = layer(x)
            return x
        run.layers = layers[block.start:block.stop]  # a segment's run says what it runs (compile.py splits it)
        runs.append((block.start, block.stop, _wrapped(run, block.modules, wraps)))

    def forward(x: torch.Tensor) -> torch.Tensor:
        i = 0
        for start, stop, segment in runs:
            for layer in layers[i:start]:
                x = layer(x)
            x = segment(x)
            i = stop
        for layer in layers[i:]:
            x = layer(x)
        return x
    return forward


def _wrapped(run: Callable[..., torch.Tensor], modules: list[nn.Module], wraps: tuple[BlockWrap, ...]
             ) -> Callable[..., torch.Tensor]:
    for wrap in wraps:
        run = wrap(run, modules)
    return run


def wrap_blocks(model: nn.Module, *wraps: BlockWrap) -> list[Block]:
    """Run the forward of every block of ``model`` through ``wraps`` (the first innermost); returns the blocks.

    The forward of a block's module (or of the nn.Sequential holding a segment) is replaced on the instance, so
    parameter names, state_dict keys and checkpoints are the same as without it. Call once per model, with
    every wrap (a second call would wrap a block's module twice, or drop the first wraps of a segment).
    """
    blocks = model_blocks(model)
    by_container: dict[int, list[Block]] = {}
    for block in blocks:
        if block.container is None:
            module = block.modules[0]
            module.forward = _wrapped(module.forward, block.modules, wraps)
        else:
            by_container.setdefault(id(block.container), []).append(block)
    for group in by_container.values():
        group[0].container.forward = _sequential_forward(group[0].container, group, wraps)
    return blocks


def enable_recompute(model: nn.Module) -> list[Block]:
    """Recompute every block of ``model`` in backward instead of keeping its activations; returns the blocks."""
    return wrap_blocks(model, recomputed)


__all__ = ["Block", "BlockWrap", "model_blocks", "wrap_blocks", "recomputed", "enable_recompute"]

"""Wrap a model in its gradient strategy: the one place where ``comm.impl`` is dispatched and where a single
process skips communication.

This rank holds ``local_count`` of the step's ``global_count`` samples. With ``comm.reduce: mean`` every rank
divides its *summed* loss by the global count and the strategy sums gradients (the exact count-weighted mean,
sync.py); the contrast modes divide by the local count. One rank (or no process group) needs no reduction at
all: :class:`~disttrain.parallel.sync.LocalSync`, whatever the strategy, because DDP, a bucketed all_reduce or
FSDP over one rank would only add cost.
"""

from __future__ import annotations

import importlib

from torch import nn

from ..config.schema import CommConfig
from .env import DistEnv
from .registry import STRATEGIES
from .sync import GradSync, LocalSync, ReduceSpec


def strategy_class(name: str) -> type[GradSync]:
    """The GradSync class registered as ``comm.impl: name``."""
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def build_grad_sync(module: nn.Module, cfg: CommConfig, env: DistEnv, local_count: int,
                    global_count: int, force_collectives: bool = False) -> GradSync:
    """Wrap ``module`` for gradient reduction per ``cfg``; this rank holds ``local_count`` of ``global_count``.

    ``force_collectives``: build the configured strategy even for one rank (a check of the collective path on a
    single device, such as tools/gpu_check.sh; the result is the same, at a cost)."""
    if not env.is_distributed or (env.world_size == 1 and not force_collectives):
        return LocalSync(module, loss_divisor=local_count)
    divisor = global_count if cfg.reduce == "mean" else local_count
    spec = ReduceSpec(mode=cfg.reduce, world_size=env.world_size)  # the default process group
    sync = strategy_class(cfg.impl)(module, spec, env, cfg, divisor)
    sync.global_loss_divisor = cfg.reduce == "mean"
    return sync


__all__ = ["strategy_class", "build_grad_sync"]

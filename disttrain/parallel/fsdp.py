"""Sharded data parallel (``comm.impl: fsdp``): torch's FSDP2 with the exact count-weighted gradient.

Each of the W ranks keeps 1/W of every parameter, of its gradient and of its optimizer state (dim-0 shards,
DTensors). ``fully_shard`` is applied to each block of the model (blocks.py: the policy, and how a model picks
its own) and then to the root, so one group of parameters is whole at a time:

- forward: before a block runs, one all_gather assembles its parameters; afterwards they are freed again
  (``comm.reshard_after_forward: true``, ZeRO-3-like: gathered a second time in backward) or kept until
  backward (``false``, ZeRO-2-like: more memory, one all_gather fewer per block);
- backward: once a block's gradients are complete, one reduce_scatter leaves each rank the sum over ranks of
  its own shard. No rank ever holds the whole reduced gradient, and the optimizer steps on shards only.

**The reduction is a SUM, never a division.** FSDP2 divides the reduced gradient by W by default: the
equal-weight average of per-rank gradients, which is not the single-device gradient for uneven slices (see
parallel/sync.py; a 5-step AdamW MLP ended 2e-6 away from one device at W=2). disttrain already divides each rank's
summed loss by the global batch size B before backward, so the gradient divide factor is set to 1 and the
reduce_scatter sums: the exact count-weighted mean for any split. ``comm.reduce: avg`` (contrast) divides by W
as FSDP2 would; ``sum`` sums local means; ``max`` has no reduce_scatter and is refused (validate.py). The sum is
forced to be a plain SUM collective (no pre-multiplied sum, which gloo lacks), with the division, if any, after.

**Clipping** needs the norm of the whole gradient, which no rank holds: each rank computes its shards' part and
one all_reduce combines them (DTensor's ``full_tensor`` of the partial norm), then every rank scales its shards by
the same factor. **Checkpoints** stay in the full-state format of the replicated strategies (tensors whole,
optimizer state keyed by parameter index), so runs resume across W and across ddp <-> fsdp, and verify reads
them: saving gathers one tensor at a time and only rank 0 keeps the CPU copy; loading broadcasts each tensor from
rank 0 and every rank keeps its shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from .blocks import model_blocks
from .sync import GradSync, ReduceSpec, check_model_state
from ..config.schema import ClipConfig, CommConfig
from .env import DistEnv
from .collectives import broadcast_from_main, sum_over_ranks
from ..errors import ConfigError

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, kept on rank 0 only
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # rank 0's whole tensors -> shards


class FSDPSync(GradSync):
    """FSDP2 ``fully_shard`` per block and on the root, reducing with a SUM (see the module docstring)."""

    def __init__(self, module: nn.Module, spec: ReduceSpec, env: DistEnv, cfg: CommConfig, loss_divisor: int):
        # comm.reshard_after_forward unset: true (ZeRO-3-like), as FSDP2's own default
        reshard_after_forward = True if cfg.reshard_after_forward is None else cfg.reshard_after_forward
        if not any(p.requires_grad for p in module.parameters()):
            raise ConfigError("comm.impl=fsdp: the model has no trainable parameters to shard")
        self.env, self.loss_divisor = env, loss_divisor
        mesh = init_device_mesh(env.device.type, (env.world_size,))  # one dimension: the whole default group
        for block in model_blocks(module):
            # The block's modules that hold parameters form one FSDP group (one all_gather, one reduce_scatter);
            # its parameter-free ones (activations, pooling, flatten) need no hooks of their own.
            group = [m for m in block.modules if any(p.requires_grad for p in m.parameters())]
            if group:
                fully_shard(group if len(group) > 1 else group[0], mesh=mesh,
                            reshard_after_forward=reshard_after_forward)
        # The root holds what no block does; by default (None) FSDP2 keeps it whole after forward, since
        # backward starts with it. With reshard_after_forward=false nothing is resharded after forward.
        fully_shard(module, mesh=mesh, reshard_after_forward=None if reshard_after_forward else False)
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(float(spec.divisor))  # 1: a SUM (mean, sum); W: avg
                m.set_force_sum_reduction_for_comms(True)
        self.module = module

    def sync(self) -> None:
        """The reduce-scatters ran in backward; the step's control values (a stop request, run/stop.py) cannot ride in
        FSDP's reduce-scatters, so they take one small all_reduce here, on the device; the step reads them back with
        the gradient norm (no host sync of their own)."""
        if self.control is not None:
            self.reduced_control = sum_over_ranks(self.control.to(self.env.device, torch.float64, copy=True),
                                                  self.env)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        # Gradients of these micro-batches accumulate unsharded on each rank; the last backward reduce-scatters
        # their sum once.
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def clip_local(self, cfg: ClipConfig) -> None:
        raise ConfigError("clip.before_average: no rank of comm.impl=fsdp holds a whole local gradient to clip")

    def _names(self) -> list[str]:
        return [name for name, _ in self.module.named_parameters()]

    def state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
        """Every rank joins one all_gather per tensor; rank 0 alone keeps the whole CPU copies."""
        model = _detached(get_model_state_dict(self.module, options=_GATHER), self.module)
        optim = None if optimizer is None else get_optimizer_state_dict(self.module, optimizer, options=_GATHER)
        if not self.env.is_main:
            return None
        state = {"model": model}
        if optimizer is not None:
            state["optimizer"] = _detached(_by_index(optim, self._names()), self.module, optimizer)
        return state

    def load_state_dict(self, state: dict[str, Any] | None, optimizer: torch.optim.Optimizer) -> None:
        """Rank 0 holds the whole state; each tensor is broadcast from it and every rank keeps its shard."""
        error = check_model_state(self.model, state["model"]) if self.env.is_main else None
        error = broadcast_from_main(error, self.env)  # every rank stops, or none does
        if error:
            raise ConfigError(error)
        model, optim = {}, {}
        if self.env.is_main:
            local = self.module.state_dict()
            model = {k: v.to(local[k].dtype) if v.is_floating_point() else v for k, v in state["model"].items()}
            optim = _by_name(state["optimizer"], self._names())
        set_model_state_dict(self.module, model, options=_SCATTER)
        set_optimizer_state_dict(self.module, optimizer, optim, options=_SCATTER)


def _detached(state: Any, module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """``state`` with every tensor that still shares memory with the live model or optimizer copied: gathered
    shards are fresh tensors, but replicated buffers (batch norm statistics, Adam's step) come back as the live
    ones, which the next step would change while a background thread writes the checkpoint."""
    live = {t.data_ptr() for t in module.buffers()}
    if optimizer is not None:
        live |= {v.data_ptr() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
                 and not isinstance(v, DTensor)}

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone() if value.data_ptr() in live else value
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value
    return copy(state)


def _by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name -> torch's own format, keyed by the parameter's index (the
    order of model.parameters(), in which the optimizer was built): what the replicated strategies save."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`_by_index`."""
    return {"state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


__all__ = ["FSDPSync"]

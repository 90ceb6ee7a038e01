"""``comm.impl: ddp``: torch DistributedDataParallel with the configured reduction as its communication hook.

DDP groups gradients into buckets of ``comm.bucket_mb`` and calls the hook once per bucket as soon as its
gradients are complete, so communication overlaps the rest of backward. The hook issues one all_reduce with the
op of :class:`~disttrain.parallel.sync.ReduceSpec` (a SUM for the exact count-weighted mean, see sync.py) and,
in the last bucket of a step, carries the step's control values (a stop request) at no extra collective. With a
hook installed DDP does no division of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config.schema import CommConfig
from .env import DistEnv

from .sync import GradSync, ReduceSpec, pack, unpack


def _ddp_comm_hook(spec, bucket):  # no annotations: DDP checks them, and this module's are strings
    # Registered with DDP: called once per bucket as soon as all its gradients are ready, overlapping
    # communication with the rest of backward. With a hook installed DDP does no division of its own.
    # The step's control values (GradSync.control) ride in the last bucket of the step: no collective of their own.
    control = spec.control if bucket.is_last() else None
    packed = bucket.buffer() if control is None else pack(bucket.buffer(), control)
    fut = dist.all_reduce(packed, op=spec.op, group=spec.group, async_op=True).get_future()
    divisor = spec.divisor

    def reduced(f):
        out = f.value()[0]
        if control is not None:
            out, spec.reduced_control = unpack(out, len(control))
        return out if divisor == 1 else out.div_(divisor)

    return fut.then(reduced)


def register_sum_hook(ddp_model: DistributedDataParallel, *, spec: ReduceSpec | None = None) -> ReduceSpec:
    """Make a stock DistributedDataParallel *sum* gradients over ranks instead of averaging them.

    DDP's own reduction divides the summed gradients by W: the equal-weight average of per-rank gradients, which
    is not the single-device gradient when ranks hold different numbers of samples (parallel/sync.py). With this
    hook each bucket is reduced by one all_reduce SUM and nothing is divided; the loop then divides each rank's
    *summed* loss by the global count (:func:`~disttrain.parallel.collectives.global_count`) before backward, and
    every rank ends with exactly the gradient of the global mean loss. Call it before the first backward.

    ``spec``: the trainer's reduction (the contrast modes and the control values ride here); default: a SUM over
    the model's process group. Returns the hook's state.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"register_sum_hook: expects a torch DistributedDataParallel, got {type(ddp_model).__name__}")
    if spec is None:
        group = ddp_model.process_group
        spec = ReduceSpec(mode="mean", group=group, world_size=dist.get_world_size(group))
    ddp_model.register_comm_hook(spec, _ddp_comm_hook)
    return spec


class DDPSync(GradSync):
    """torch DistributedDataParallel with the configured reduction as its comm hook (one all_reduce per bucket)."""

    def __init__(self, module: nn.Module, spec: ReduceSpec, env: DistEnv, cfg: CommConfig, loss_divisor: int):
        bucket_mb = cfg.bucket_mb
        self.loss_divisor = loss_divisor
        self.env = env
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        self.module = DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=bucket_mb,
                                              process_group=spec.group)
        self._spec = register_sum_hook(self.module, spec=spec)

    @property
    def model(self) -> nn.Module:
        return self.module.module

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with self.module.no_sync():
            yield

    def sync(self) -> None:
        """Nothing to do: backward reduced every bucket through the comm hook."""

    @property
    def control(self) -> torch.Tensor | None:
        return self._spec.control

    @control.setter
    def control(self, value: torch.Tensor | None) -> None:
        self._spec.control = value  # the comm hook's state: read in the last bucket of every step

    @property
    def reduced_control(self) -> torch.Tensor | None:
        return self._spec.reduced_control


__all__ = ["register_sum_hook", "DDPSync"]

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



class DDPSync(GradSync):
    """torch DistributedDataParallel with the configured reduction as its comm hook (one all_reduce per bucket)."""

    def __init__(self, module: nn.Module, spec: ReduceSpec, env: DistEnv, cfg: CommConfig, loss_divisor: int):
        bucket_mb = cfg.bucket_mb
        self.loss_divisor = loss_divisor
        self.env = env
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        self.module = DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=bucket_mb,
                                              process_group=spec.group)
        self._spec = spec
        self.module.register_comm_hook(spec, _ddp_comm_hook)

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

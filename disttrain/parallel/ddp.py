"""Gradient averaging: DistributedDataParallel, an explicit bucketed all-reduce, and reduce modes.

The single-device gradient on a global batch of B samples is g = (1/B) sum_i grad l_i. Rank r holds
b_r of the samples (sum b_r = B; B=30 over W=4 gives 8, 8, 7, 7).

**mean (the default, exact).** Every rank divides its *summed* loss by the global B before backward, so it
holds (1/B) sum_{i in r} grad l_i, and the gradients are *summed* across ranks: the result is exactly g, for
any split. Equivalently, each rank's local mean loss is weighted by b_r/B (W*b_r/B under DDP's built-in
1/W average): the count-weighted mean. DDP's plain average of local-mean gradients, (1/W) sum_r g_r with
g_r = (1/b_r) sum_{i in r} grad l_i, equals g only when every b_r = B/W.

Why the weight goes into the loss, before backward, rather than into the reduction afterwards: layers that
couple ranks inside backward (SyncBatchNorm sums dy over the global batch) must see every rank's dy on the
same scale, that of the global objective (1/B) sum_i l_i. Weighting each rank's gradient after its
backward would mix dy's scaled by different 1/b_r inside those sums.

**sum, max and avg (contrast modes).** Each rank backpropagates its local mean loss (the gradient g_r a single
process computes on its slice) and the reduction is:
    sum: sum_r g_r        = W * g for equal splits (a W-times larger step for SGD, not for Adam)
    max: max_r g_r        elementwise; not the gradient of anything
    avg: (1/W) sum_r g_r  torch DDP's own averaging (all-reduce SUM, then divide by W): equal to g
                          only when every b_r = B/W (B=32 over W=4), not for uneven slices (B=30)
so the difference between averaging, summing and taking the maximum is visible in `disttrain verify`.

Both implementations issue one all_reduce per gradient bucket with the op from :data:`_OPS`, so "ddp" and
"allreduce" can only differ in how gradients are grouped into buckets, never in what is computed.
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

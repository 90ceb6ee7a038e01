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


import torch
import torch.distributed as dist
from torch import nn

from ..config.schema import CommConfig
from .env import DistEnv

from .sync import GradSync, ReduceSpec, pack, unpack


class AllReduceSync(GradSync):
    """Explicit path: after backward, flatten gradients into buckets and all_reduce each bucket once.

    Buckets are filled in reverse parameter order (the order backward produces gradients, as DDP does)
    and hold one dtype/device each. A parameter without a gradient contributes zeros, so every rank
    issues the same collectives with the same sizes.
    """

    def __init__(self, module: nn.Module, spec: ReduceSpec, env: DistEnv, cfg: CommConfig, loss_divisor: int):
        bucket_mb = cfg.bucket_mb
        self.module = module
        self.spec = spec
        self.env = env
        self.loss_divisor = loss_divisor
        cap = int(bucket_mb * 2**20)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        size, key = 0, None
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if not self.buckets or key != (p.dtype, p.device) or (size + nbytes > cap and size > 0):
                self.buckets.append([])
                size, key = 0, (p.dtype, p.device)
            self.buckets[-1].append(p)
            size += nbytes

    def sync(self) -> None:
        for i, bucket in enumerate(self.buckets):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            control = self.control if i == len(self.buckets) - 1 else None
            if control is not None:  # the step's control values ride in its last bucket
                flat = pack(flat, control)
            dist.all_reduce(flat, op=self.spec.op, group=self.spec.group)
            if control is not None:
                flat, self.reduced_control = unpack(flat, len(control))
            if self.spec.divisor != 1:
                flat.div_(self.spec.divisor)
            offset = 0
            for p in bucket:
                n = p.numel()
                reduced = flat[offset: offset + n].view_as(p)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
                offset += n

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

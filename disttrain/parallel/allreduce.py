"""``comm.impl: allreduce``: the explicit path. After backward, gradients are flattened into buckets of
``comm.bucket_mb`` and each bucket is all-reduced once, with the same op as the DDP hook (sync.py), so the two
implementations can differ only in how gradients are grouped, never in what is computed.
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

"""Gradient averaging: DistributedDataParallel, an explicit bucketed all-reduce, and reduce modes.

Every rank backpropagates its *local mean* loss, so rank r holds g_r = (1/b_r) sum_{i in r} grad l_i.
The single-device gradient on the global batch of B samples is

    g = (1/B) sum_i grad l_i = sum_r (b_r / B) g_r            (the count-weighted mean)

DDP's built-in averaging computes (1/W) sum_r g_r, which equals g only when every b_r = B/W. disttrain
applies the count weight b_r/B in the communication step instead: each rank multiplies its gradient
bucket by b_r/B and the buckets are summed. That is one all_reduce per bucket, exactly like DDP's, and
exact for uneven splits (B=30 over W=4 gives slices 8, 8, 7, 7). Keeping the weight out of the loss means
the loss a rank backpropagates is the plain local mean, and the contrast modes see unweighted gradients:

    sum: sum_r g_r      = W * g for equal splits (a W-times larger step for SGD, not for Adam)
    max: max_r g_r      elementwise; not the gradient of anything

The same function (:func:`_prepare_bucket`) serves both implementations, so "ddp" and "allreduce" can
only differ in how gradients are grouped into buckets, never in what is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import CommConfig
from .dist import DistEnv

_OPS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclass
class ReduceSpec:
    """How this rank's gradient enters the reduction."""

    mode: str  # mean | sum | max
    weight: float  # b_r / B, used by "mean" only
    group: dist.ProcessGroup | None = None


def _prepare_bucket(flat: torch.Tensor, spec: ReduceSpec) -> dist.ReduceOp:
    """Scale a flat gradient bucket in place for ``spec.mode``; return the all_reduce op to apply."""
    if spec.mode == "mean":
        flat.mul_(spec.weight)
    return _OPS[spec.mode]


def _ddp_comm_hook(spec, bucket):  # no annotations: DDP checks them, and this module's are strings
    # Registered with DDP: called once per bucket as soon as all its gradients are ready, overlapping
    # communication with the rest of backward. With a hook installed DDP does no division of its own.
    flat = bucket.buffer()
    op = _prepare_bucket(flat, spec)
    fut = dist.all_reduce(flat, op=op, group=spec.group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class GradSync:
    """What the step function needs from gradient communication."""

    module: nn.Module  # call forward on this

    def sync(self) -> None:
        """Make every rank's .grad the reduced gradient (no-op where backward already did it)."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally, without communication."""
        yield


class LocalSync(GradSync):
    """One process, no group: the local gradient is already the global one."""

    def __init__(self, module: nn.Module):
        self.module = module


class DDPSync(GradSync):
    """torch DistributedDataParallel with the count-weighted reduction as its comm hook."""

    def __init__(self, module: nn.Module, spec: ReduceSpec, env: DistEnv, bucket_mb: float):
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        self.module = DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=bucket_mb,
                                              process_group=spec.group)
        self.module.register_comm_hook(spec, _ddp_comm_hook)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with self.module.no_sync():
            yield


class AllReduceSync(GradSync):
    """Explicit path: after backward, flatten gradients into buckets and all_reduce each bucket once.

    Buckets are filled in reverse parameter order (the order backward produces gradients, as DDP does)
    and hold one dtype/device each. A parameter without a gradient contributes zeros, so every rank
    issues the same collectives with the same sizes.
    """

    def __init__(self, module: nn.Module, spec: ReduceSpec, bucket_mb: float):
        self.module = module
        self.spec = spec
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
        for bucket in self.buckets:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            op = _prepare_bucket(flat, self.spec)
            dist.all_reduce(flat, op=op, group=self.spec.group)
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


def build_grad_sync(module: nn.Module, cfg: CommConfig, env: DistEnv, local_count: int,
                    global_count: int) -> GradSync:
    """Wrap ``module`` for gradient reduction; ``local_count / global_count`` is this rank's weight b_r/B."""
    if not env.is_distributed:
        return LocalSync(module)
    spec = ReduceSpec(mode=cfg.reduce, weight=local_count / global_count, group=env.group)
    if cfg.impl == "ddp":
        return DDPSync(module, spec, env, cfg.bucket_mb)
    return AllReduceSync(module, spec, cfg.bucket_mb)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module

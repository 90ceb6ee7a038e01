"""Model parallelism as AlexNet did it: one layer's output features split over the ranks, activations exchanged.

The built-in MLP (Linear in->H, ReLU, Linear H->H, ReLU, Linear H->C; no norm, no dropout) with its middle layer
split by output features: rank r holds rows [r H/W, (r+1) H/W) of that weight and bias, every other parameter
is replicated, and every rank runs the *whole* global batch (nothing is split by sample). Two collectives, each
written here as an autograd Function:

- ``GatherFeatures`` after the split layer: forward, one all_gather of the W slices of its activations (B x H/W
  each) into the whole B x H; backward, each rank keeps the gradient of its own slice (every rank runs the same
  replicated layers after it on the same inputs, so they all hold the same whole gradient: no communication).
- ``CopyToRanks`` before it: forward the identity; backward, one all_reduce: the gradient reaching the replicated
  layer in front is the sum of the W slices' contributions.

So the bytes a step moves grow with the batch (B x H activations, twice) and not with the parameters, the
opposite of data parallelism, which moves each gradient once whatever the batch. The replicated layers'
gradients are then the same on every rank and need no reduction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class CopyToRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks (one all_reduce)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class GatherFeatures(torch.autograd.Function):
    """Forward: the ranks' feature slices (last dimension) concatenated in rank order (one all_gather); backward:
    this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.width, ctx.rank = local.shape[-1], rank
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.width
        return grad[..., start:start + ctx.width].contiguous()


class SplitMLP(nn.Module):
    """The built-in MLP (norm none, no dropout) with its middle Linear split by output features over the ranks."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        first, middle, last = mlp.net[0], mlp.net[3], mlp.net[-1]
        world, rank = dist.get_world_size(), dist.get_rank()
        hidden = middle.out_features
        if hidden % world:
            raise ValueError(f"model.hidden={hidden} must be a multiple of the world size {world} to split it")
        width = hidden // world
        self.first, self.last = first, last
        self.middle = nn.Linear(middle.in_features, width, dtype=middle.weight.dtype)
        with torch.no_grad():  # this rank's rows of the one seeded weight: the same model as on one device
            self.middle.weight.copy_(middle.weight[rank * width:(rank + 1) * width])
            self.middle.bias.copy_(middle.bias[rank * width:(rank + 1) * width])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = CopyToRanks.apply(torch.relu(self.first(x.flatten(1))))
        h = GatherFeatures.apply(torch.relu(self.middle(a)))
        return self.last(h)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters under the MLP's own names (the split layer gathered, on every rank)."""
        state = {"net.0.weight": self.first.weight, "net.0.bias": self.first.bias,
                 "net.6.weight": self.last.weight, "net.6.bias": self.last.bias}
        for name in ("weight", "bias"):
            local = getattr(self.middle, name).detach()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            state[f"net.3.{name}"] = torch.cat(parts)
        return {k: v.detach().clone() for k, v in state.items()}


__all__ = ["CopyToRanks", "GatherFeatures", "SplitMLP"]

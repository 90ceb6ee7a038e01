"""Linear and Conv2d layers run slice by slice: the rounding of W ranks, in one process.

A W-process run computes every Linear/Conv on each rank's slice of the batch alone, and each weight gradient as W
partial sums over those slices, each leaving its matmul rounded to the compute precision (bf16/fp16 under autocast:
8 or 11 significant bits), then added in float32 by the all_reduce. One process computing the whole batch in one op
rounds the weight gradient once, and may pick other kernels for the larger batch. So verify's reference and twin
(twin.py) run every nn.Linear and nn.Conv2d on ``chunks`` slices of the batch (the ranks' parts,
data/batching.py rank_parts): the output and the input gradient slice by slice, the weight (and bias) gradient as
the sum of per-slice gradients, each rounded as a rank's would be. In exact arithmetic the same numbers; in floating
point the same shapes and the same partial sums as the W-process run.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import rank_parts


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """autocast's dtype on ``device`` when autocast is on, else None (the tensors' own dtype)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _parts(n: int, chunks: int, order: tuple[int, ...] | None) -> list[slice]:
    """The non-empty slices of a batch of ``n`` that ``chunks`` ranks hold, laid out in ``order`` (an empty batch:
    itself)."""
    return [s for _, s in rank_parts(n, chunks, order) if s.stop > s.start] or [slice(0, n)]


class _Chunked(torch.autograd.Function):
    """y = op(x, w, b) slice by slice; backward: dx slice by slice, dw (and db) summed over the slices, each rounded
    alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, chunks):
        ctx.layer, ctx.chunks, ctx.has_bias = layer, chunks, bias is not None
        ctx.dtype = _compute_dtype(x.device)
        ctx.save_for_backward(x, weight)
        parts = _parts(len(x), chunks, layer._twin_order)
        if len(parts) == 1:
            return layer._twin_op(x, weight, bias)
        return torch.cat([layer._twin_op(x[part], weight, bias) for part in parts])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dt = ctx.dtype or dy.dtype
        xs, ws, dys = x.to(dt), weight.to(dt), dy.to(dt)
        parts = _parts(len(x), ctx.chunks, ctx.layer._twin_order)
        with torch.autocast(x.device.type, enabled=False):
            dx = torch.cat([ctx.layer._twin_input_grad(xs[part], ws, dys[part]) for part in parts]).to(x.dtype)
            dw = torch.zeros_like(weight)
            db = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if ctx.has_bias else None
            for part in parts:
                dw += ctx.layer._twin_weight_grad(xs[part], ws, dys[part]).to(weight.dtype)
                if db is not None:  # a bias gradient is a sum over the batch too
                    channel = ctx.layer._twin_channel_dim % dys.dim()
                    db += dys[part].sum(dim=[d for d in range(dys.dim()) if d != channel]).to(weight.dtype)
        return dx, dw, db, None, None


def _linear_input_grad(self, x, w, dy):
    return dy @ w


def _linear_weight_grad(self, x, w, dy):
    return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _conv_op(self, x, w, b):
    return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def _conv_input_grad(self, x, w, dy):
    return torch.nn.grad.conv2d_input(x.shape, w, dy, self.stride, self.padding, self.dilation, self.groups)


def _conv_weight_grad(self, x, w, dy):
    return torch.nn.grad.conv2d_weight(x, w.shape, dy, self.stride, self.padding, self.dilation, self.groups)


def _chunked_forward(self, x):
    return _Chunked.apply(x, self.weight, self.bias, self, self._twin_chunks)


def chunk_weight_gradients(model: nn.Module, chunks: int, order: tuple[int, ...] | None = None) -> int:
    """Give every nn.Linear and nn.Conv2d (zero padding) of ``model`` a backward that sums its weight gradient over
    ``chunks`` slices of the batch. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module._twin_op = types.MethodType(lambda self, x, w, b: F.linear(x, w, b), module)
            module._twin_input_grad = types.MethodType(_linear_input_grad, module)
            module._twin_weight_grad = types.MethodType(_linear_weight_grad, module)
        elif type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            module._twin_op = types.MethodType(_conv_op, module)
            module._twin_input_grad = types.MethodType(_conv_input_grad, module)
            module._twin_weight_grad = types.MethodType(_conv_weight_grad, module)
        else:
            continue
        module._twin_chunks, module._twin_order = chunks, order
        module._twin_channel_dim = 1 if type(module) is nn.Conv2d else -1  # where a bias adds to the output
        module.forward = types.MethodType(_chunked_forward, module)
        changed += 1
    return changed


__all__ = ["chunk_weight_gradients"]

"""Weight gradients summed chunk by chunk: the rounding of partial sums, in one process.

A W-process run computes each weight gradient as W partial sums over the ranks' slices, each leaving its matmul
rounded to the compute precision (bf16/fp16 under autocast: 8 or 11 significant bits), then adds them in float32.
One process computes the whole sum and rounds it once. Reordering samples alone (twin.py) only reorders sums
*inside* the matmul's float32 accumulator, far below that rounding. So the twin also computes the weight
gradient of every nn.Linear and nn.Conv2d as the sum of per-chunk gradients, each rounded as a rank's would be:
in exact arithmetic the same number, in floating point the same kind of rounding as a W-process run.

The forward is unchanged (the same op on the whole batch); only backward is split along the batch dimension.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import local_slice


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """autocast's dtype on ``device`` when autocast is on, else None (the tensors' own dtype)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _Chunked(torch.autograd.Function):
    """y = op(x, w, b); backward: dw (and db) summed over ``chunks`` slices of the batch, each rounded alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, chunks):
        ctx.layer, ctx.chunks, ctx.has_bias = layer, chunks, bias is not None
        ctx.dtype = _compute_dtype(x.device)
        ctx.save_for_backward(x, weight)
        return layer._twin_op(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dt = ctx.dtype or dy.dtype
        xs, ws, dys = x.to(dt), weight.to(dt), dy.to(dt)
        with torch.autocast(x.device.type, enabled=False):
            dx = ctx.layer._twin_input_grad(xs, ws, dys).to(x.dtype)
            dw = torch.zeros_like(weight)
            db = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if ctx.has_bias else None
            for part in (local_slice(len(x), ctx.chunks, j) for j in range(ctx.chunks)):
                if part.stop == part.start:
                    continue
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


def chunk_weight_gradients(model: nn.Module, chunks: int) -> int:
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
        module._twin_chunks = chunks
        module._twin_channel_dim = 1 if type(module) is nn.Conv2d else -1  # where a bias adds to the output
        module.forward = types.MethodType(_chunked_forward, module)
        changed += 1
    return changed


__all__ = ["chunk_weight_gradients"]

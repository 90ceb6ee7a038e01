"""SyncBatchNorm forward+backward per layer call: disttrain against two-pass and all_gather baselines.

    disttrain bench syncbn [--iters 60] [--world-sizes 2,4] [--channels 64,256] [--json]

Compared, per world size and channel count, on the same per-rank input:
- ``disttrain``: disttrain.syncbn.SyncBatchNorm with its per-backend collective (all_gather on gloo);
- ``disttrain all_reduce``: the same layer forced to its all_reduce scheme (the NCCL choice);
- ``two-pass``: the classic SyncBN, two all_reduces forward (sum, then squared deviations around the
  global mean) and two backward (sum dy, then sum dy * xhat);
- ``all_gather+Chan``: the scheme torch.nn.SyncBatchNorm uses on GPUs, re-implemented for CPU: all_gather
  of (mean, invstd, count) in the input dtype, Chan merge, one all_reduce of 2C backward;
- ``local``: torch batch norm on each rank's slice, no communication (the floor).
The baselines share disttrain's element-wise formulation where they can, so the times differ mainly in
communication. A benchmark prints numbers; nothing here is a test. Medians and ratios come from one run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..parallel.syncbn import BatchNormXd, SyncBatchNorm
from .common import RunWorld, interleaved, machine, markdown_table, positive_int, positive_ints, slowest_median_ms, spawn_world, time_calls

# ResNet-like activations per rank: (N, H=W) by channel count.
DEFAULT_SHAPES = {64: (16, 16), 256: (16, 8)}


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _update_running(layer: _BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    with torch.no_grad():
        layer.num_batches_tracked.add_(1)
        m = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
        layer.running_mean.mul_(1 - m).add_(m * mean.to(layer.running_mean.dtype))
        layer.running_var.mul_(1 - m).add_(m * unbiased_var.to(layer.running_var.dtype))


def _input_grad(dy, d, invstd, weight, sum_dy, sum_dy_xmu, n):
    """dx = w invstd (dy - sum_dy/n - (x - mean) invstd^2 sum_dy_xmu/n), with d = x - mean."""
    a = invstd * weight
    k = -a * invstd * invstd * sum_dy_xmu / n
    return d.mul_(_view(k, d.dim())).add_(_view(-a * sum_dy / n, d.dim())).addcmul_(dy, _view(a, d.dim()))


class _TwoPassFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        dims, channels = _dims(x), x.shape[1]
        s1 = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // channels)])
        dist.all_reduce(s1)  # 1: sums and count
        n = s1[channels]
        mean = s1[:channels] / n
        d = x - _view(mean, x.dim())
        m2 = (d * d).sum(dims)
        dist.all_reduce(m2)  # 2: squared deviations around the global mean
        invstd = (m2 / n + layer.eps).rsqrt()
        _update_running(layer, mean, m2 / (n - 1))
        ctx.save_for_backward(x, weight, mean, invstd, n)
        return d.mul_(_view(invstd * weight, x.dim())).add_(_view(bias, x.dim()))

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims = _dims(x)
        d = x - _view(mean, x.dim())
        local_dy, local_dy_xmu = dy.sum(dims), (dy * d).sum(dims)
        sum_dy, sum_dy_xmu = local_dy.clone(), local_dy_xmu.clone()
        dist.all_reduce(sum_dy)  # 1
        dist.all_reduce(sum_dy_xmu)  # 2
        dx = _input_grad(dy, d, invstd, weight, sum_dy, sum_dy_xmu, n)
        return dx, local_dy_xmu * invstd, local_dy, None


class _AllGatherChanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        dims, channels = _dims(x), x.shape[1]
        count = x.numel() // channels
        mean_r = x.sum(dims) / max(count, 1)
        var_r = (x - _view(mean_r, x.dim())).square().sum(dims) / max(count, 1)
        local = torch.cat([mean_r, (var_r + layer.eps).rsqrt(), x.new_full((1,), count)])
        rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, local)  # the one forward collective: W x (2C+1) in the input dtype
        table = torch.stack(rows)
        mean_all, invstd_all, n_all = table[:, :channels], table[:, channels:2 * channels], table[:, 2 * channels:]
        var_all = (invstd_all.reciprocal().square() - layer.eps) * (n_all > 0)
        n = n_all.sum()
        mean = (n_all * mean_all).sum(0) / n
        m2 = (n_all * (var_all + (mean_all - mean) ** 2)).sum(0)
        invstd = (m2 / n + layer.eps).rsqrt()
        _update_running(layer, mean, m2 / (n - 1))
        ctx.save_for_backward(x, weight, mean, invstd, n)
        d = x - _view(mean, x.dim())
        return d.mul_(_view(invstd * weight, x.dim())).add_(_view(bias, x.dim()))

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims, channels = _dims(x), x.shape[1]
        d = x - _view(mean, x.dim())
        local = torch.cat([dy.sum(dims), (dy * d).sum(dims)])
        total = local.clone()
        dist.all_reduce(total)  # the one backward collective
        dx = _input_grad(dy, d, invstd, weight, total[:channels], total[channels:], n)
        return dx, local[channels:] * invstd, local[:channels], None


class _BaselineSyncBN(BatchNormXd):
    function: type[torch.autograd.Function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self.function.apply(x, self.weight, self.bias, self)


class TwoPassSyncBatchNorm(_BaselineSyncBN):
    """Classic SyncBN: two all_reduces forward, two backward (affine, running stats; a baseline only)."""

    function = _TwoPassFunction


class AllGatherChanSyncBatchNorm(_BaselineSyncBN):
    """torch.nn.SyncBatchNorm's scheme on CPU: one all_gather forward, one all_reduce backward."""

    function = _AllGatherChanFunction


def _forced_all_reduce(channels: int) -> SyncBatchNorm:
    layer = SyncBatchNorm(channels)
    layer.collective = "all_reduce"
    return layer


def implementations() -> dict[str, Callable[[int], nn.Module]]:
    """Name -> factory(num_features) for every layer the benchmark times."""
    return {"disttrain": SyncBatchNorm, "disttrain all_reduce": _forced_all_reduce,
            "two-pass": TwoPassSyncBatchNorm, "all_gather+Chan": AllGatherChanSyncBatchNorm, "local": BatchNormXd}


def _rank_syncbn(configs: list[tuple[int, int, int]], iters: int, rounds: int) -> list[dict[str, list[float]]]:
    """On every rank: seconds per forward+backward call of each implementation, per (channels, N, size)."""
    rank, out = dist.get_rank(), []
    for channels, batch, size in configs:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(batch, channels, size, size, generator=g).requires_grad_()
        dy = torch.randn(x.shape, generator=g)
        layers = {name: make(channels) for name, make in implementations().items()}
        for layer in layers.values():  # warm-up
            time_calls(lambda layer=layer: layer(x).backward(dy), 3)
        per_round = max(iters // rounds, 1)
        out.append(interleaved({name: (lambda layer=layer: time_calls(lambda: layer(x).backward(dy), per_round))
                                for name, layer in layers.items()}, rounds))
    return out


def bench_syncbn(world_sizes: tuple[int, ...] = (2, 4), channels: tuple[int, ...] = (64, 256), iters: int = 60,
                 rounds: int = 3, shapes: dict[int, tuple[int, int]] | None = None,
                 run_world: RunWorld = spawn_world) -> list[dict]:
    """Forward+backward time per layer call; one row per (world size, channels).

    Each row holds the per-rank input shape, each implementation's median time in ms (the slowest rank's
    median: a synchronised layer is as fast as its slowest rank) and disttrain's ratios to the baselines.
    """
    shapes = {**DEFAULT_SHAPES, **(shapes or {})}
    configs = [(c, *shapes.get(c, (16, 8))) for c in channels]
    rows = []
    for world_size in world_sizes:
        per_rank = run_world(world_size, _rank_syncbn, configs, iters, rounds)
        for i, (c, batch, size) in enumerate(configs):
            ms = slowest_median_ms([rank_out[i] for rank_out in per_rank])
            rows.append({"world_size": world_size, "channels": c, "shape": [batch, c, size, size], "ms": ms,
                         "vs_two_pass": ms["disttrain"] / ms["two-pass"],
                         "vs_all_gather_chan": ms["disttrain"] / ms["all_gather+Chan"]})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=positive_int, default=60,
                        help="timed calls per implementation and config (default 60)")
    parser.add_argument("--world-sizes", type=positive_ints, default=(2, 4),
                        help="comma-separated process counts (default 2,4)")
    parser.add_argument("--channels", type=positive_ints, default=(64, 256),
                        help="comma-separated channel counts (default 64,256)")


def run(args: argparse.Namespace, run_world: RunWorld = spawn_world) -> dict[str, Any]:
    rows = bench_syncbn(world_sizes=args.world_sizes, channels=args.channels, iters=args.iters, run_world=run_world)
    return {"benchmark": "syncbn", "machine": machine(), "setting": {"iters": args.iters, "dtype": "float32"},
            "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    names = list(rows[0]["ms"]) if rows else []
    header = ["W", "per-rank input"] + [f"{n} ms" for n in names] + ["disttrain / two-pass",
                                                                      "disttrain / all_gather+Chan"]
    return markdown_table(header, [
        [str(row["world_size"]), "x".join(map(str, row["shape"]))] + [f"{row['ms'][n]:.2f}" for n in names]
        + [f"{row['vs_two_pass']:.2f}", f"{row['vs_all_gather_chan']:.2f}"] for row in rows])

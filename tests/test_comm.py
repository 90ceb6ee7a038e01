"""Gradient reduction after one backward: only the count-weighted mean equals the single-device gradient.

The expected values are computed here, in one process, from each rank's slice: g (whole global batch),
g_r (rank r's local-mean gradient), and from them sum_r g_r, max_r g_r and the unweighted mean.
The model has per-rank BatchNorm-free layers only (no cross-rank coupling), so g_r is well defined.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from disttrain.parallel.allreduce import AllReduceSync
from disttrain.parallel.strategies import build_grad_sync
from disttrain.config import load_config
from disttrain.data.dataset import build_dataset
from disttrain.data.loader import GlobalBatches
from disttrain.parallel.env import distributed
from disttrain.models.build import build_model

MODEL = ["model.name=cnn", "data.num_samples=64", "train.dtype=float64", "train.device=cpu"]


def _setup(cfg, rank: int, world_size: int):
    ds = build_dataset(cfg.data, cfg.model.name, cfg.seed, torch.float64)
    batches = GlobalBatches(ds, cfg.train.global_batch_size, cfg.seed, rank, world_size)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, cfg.seed, torch.float64, torch.device("cpu"))
    return batches, model


def _backward(module, x, y, divisor: int) -> None:
    (torch.nn.functional.cross_entropy(module(x), y, reduction="sum") / divisor).backward()


def reduced_grads(overrides: list[str], count_collectives: bool = False):
    """On every rank: one forward/backward on the rank's slice, then the configured reduction."""
    cfg = load_config(None, overrides)
    calls = []
    real = dist.all_reduce
    if count_collectives:
        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)
        dist.all_reduce = counting
    try:
        with distributed("cpu") as env:
            batches, model = _setup(cfg, env.rank, env.world_size)
            sync = build_grad_sync(model, cfg.comm, env, batches.local_batch_size, cfg.train.global_batch_size)
            _backward(sync.module, *batches.batch(0, env.device), sync.loss_divisor)
            sync.sync()
            buckets = sync.num_buckets if isinstance(sync, AllReduceSync) else None
    finally:
        dist.all_reduce = real
    return [p.grad.clone() for p in model.parameters()], calls, buckets


def local_grads(overrides: list[str], world_size: int):
    """In this process: the single-device gradient g, and every rank's local-mean gradient g_r."""
    cfg = load_config(None, overrides)
    out = []
    for rank, w in [(0, 1)] + [(r, world_size) for r in range(world_size)]:
        batches, model = _setup(cfg, rank, w)
        _backward(model, *batches.batch(0, torch.device("cpu")), batches.local_batch_size)  # local mean
        out.append([p.grad.clone() for p in model.parameters()])
    return out[0], out[1:]


def assert_grads_close(actual, expected, rtol=1e-12):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=1e-15)


def max_rel(actual, expected) -> float:
    return max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))


@pytest.mark.parametrize("impl", ["ddp", "allreduce"])
def test_reduce_modes_uneven_split(pools, impl):
    world, overrides = 4, MODEL + ["train.global_batch_size=30", f"comm.impl={impl}"]  # slices 8, 8, 7, 7
    g, g_r = local_grads(overrides, world)
    pool = pools(world)

    mean = pool.run(reduced_grads, overrides + ["comm.reduce=mean"])
    for grads, _, _ in mean:
        assert_grads_close(grads, g)  # the count-weighted mean is the single-device gradient
    # ... whereas DDP's plain 1/W average of the local means is not, for uneven slices:
    unweighted = [sum(gs) / world for gs in zip(*g_r)]
    assert max_rel(unweighted, g) > 1e-3

    total = pool.run(reduced_grads, overrides + ["comm.reduce=sum"])
    assert_grads_close(total[0][0], [sum(gs) for gs in zip(*g_r)])
    average = pool.run(reduced_grads, overrides + ["comm.reduce=avg"])  # DDP's own averaging
    assert_grads_close(average[0][0], unweighted)
    biggest = pool.run(reduced_grads, overrides + ["comm.reduce=max"])
    assert_grads_close(biggest[0][0], [torch.stack(gs).amax(0) for gs in zip(*g_r)])
    assert max_rel(biggest[0][0], g) > 1e-2
    for results in (total, average, biggest):  # every rank holds the same reduced gradient
        for grads, _, _ in results[1:]:
            assert_grads_close(grads, results[0][0], rtol=0)


def test_mean_divides_the_summed_loss_by_the_global_batch():
    from disttrain.parallel.sync import LocalSync
    from disttrain.parallel.env import DistEnv

    env = DistEnv(rank=1, local_rank=1, world_size=4, device=torch.device("cpu"), backend="gloo")
    cfg = load_config(None, ["comm.impl=allreduce"])  # built without DDP: no process group needed
    assert build_grad_sync(torch.nn.Linear(2, 2), cfg.comm, env, 8, 30).loss_divisor == 30
    for mode in ("sum", "max", "avg"):
        cfg = load_config(None, ["comm.impl=allreduce", f"comm.reduce={mode}"])
        assert build_grad_sync(torch.nn.Linear(2, 2), cfg.comm, env, 8, 30).loss_divisor == 8
    assert LocalSync(torch.nn.Linear(2, 2), 30).loss_divisor == 30


def test_sum_is_world_size_times_the_gradient_for_equal_splits(pools):
    world, overrides = 4, MODEL + ["train.global_batch_size=32"]
    g, _ = local_grads(overrides, world)
    (grads, _, _), *_ = pools(world).run(reduced_grads, overrides + ["comm.reduce=sum"])
    assert_grads_close(grads, [world * t for t in g])
    # DDP's plain average of local means is exact when every rank holds B/W samples (8, 8, 8, 8).
    (grads, _, _), *_ = pools(world).run(reduced_grads, overrides + ["comm.reduce=avg"])
    assert_grads_close(grads, g)


def test_ddp_and_explicit_paths_agree_for_every_mode(pools):
    overrides = MODEL + ["train.global_batch_size=30"]
    pool = pools(3)
    for mode in ("mean", "sum", "max", "avg"):
        ddp = pool.run(reduced_grads, overrides + [f"comm.reduce={mode}", "comm.impl=ddp"])[0][0]
        explicit = pool.run(reduced_grads, overrides + [f"comm.reduce={mode}", "comm.impl=allreduce"])[0][0]
        assert_grads_close(explicit, ddp, rtol=1e-14)


def test_explicit_path_one_all_reduce_per_bucket(pools):
    overrides = MODEL + ["train.global_batch_size=30", "comm.impl=allreduce"]
    n_params = sum(p.numel() for p in _setup(load_config(None, overrides), 0, 1)[1].parameters())
    pool = pools(2)
    _, calls, buckets = pool.run(reduced_grads, overrides, count_collectives=True)[0]
    assert (calls, buckets) == ([n_params], 1)  # the whole model fits one 25 MiB bucket: one collective
    small = overrides + ["comm.bucket_mb=0.004"]  # 4 KiB = 512 float64 values per bucket
    _, calls, buckets = pool.run(reduced_grads, small, count_collectives=True)[0]
    assert len(calls) == buckets > 2 and sum(calls) == n_params


def summed_over_ranks() -> list[float]:
    from disttrain.parallel.collectives import sum_over_ranks

    with distributed("cpu") as env:
        return sum_over_ranks(torch.tensor([float(env.rank), 1.0], dtype=torch.float64), env).tolist()


def test_sum_over_ranks(pools):
    assert pools(3).run(summed_over_ranks) == [[3.0, 3.0]] * 3  # ranks 0+1+2, and the count of ranks
    assert summed_over_ranks() == [0.0, 1.0]  # no process group: unchanged

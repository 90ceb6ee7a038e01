"""The public API (``import disttrain``): each exact part on its own, against a single process computed here.

Collectives run on the session's worker pools (tests/conftest.py); the rest needs no process group.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import disttrain
from disttrain.data.batching import global_batch_indices, local_slice


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _batch(n: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def _reference(max_norm: float) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
    """One process on the whole batch: the mean-loss gradient, its norm, and the gradient clipped by torch."""
    model = _model()
    x, y = _batch()
    ((model(x) - y) ** 2).sum(dim=1).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    return grads, norm, [p.grad.clone() for p in model.parameters()]


def test_import_disttrain_stays_cheap_and_every_name_is_the_trainers_own():
    out = subprocess.run([sys.executable, "-c", "import sys, disttrain; assert 'torch' not in sys.modules; "
                          "print(' '.join(disttrain.__all__))"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["__version__", *disttrain._API]
    from disttrain.data.sampler import GlobalBatchSampler
    from disttrain.optim import clip, schedule
    from disttrain.parallel import collectives, ddp, syncbn
    assert disttrain.GlobalBatchSampler is GlobalBatchSampler and disttrain.lr_at is schedule.lr_at
    assert disttrain.clip_grad_norm_ is clip.clip_grad_norm_ and disttrain.register_sum_hook is ddp.register_sum_hook
    assert disttrain.global_count is collectives.global_count and disttrain.SyncBatchNorm is syncbn.SyncBatchNorm
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        disttrain.nope


def test_global_batch_sampler_slices_the_trainers_global_batches_and_resumes_in_o1():
    n, b = 100, 31
    samplers = [disttrain.GlobalBatchSampler(n, b, seed=7, rank=r, world_size=3) for r in range(3)]
    assert [s.local_batch_size for s in samplers] == [11, 10, 10]
    assert len(samplers[0]) == 3  # one pass: the 100 // 31 steps of the first epoch
    passes = [[list(s) for _ in range(2)] for s in samplers]  # two passes: steps 0-2, then 3-5
    for step in range(6):
        whole = global_batch_indices(step, b, n, 7).tolist()
        assert sum((passes[r][step // 3][step % 3] for r in range(3)), []) == whole  # no padding, no repeat
    assert samplers[0].step == 6
    resumed = disttrain.GlobalBatchSampler(n, b, seed=7, rank=1, world_size=3, start_step=4)
    assert len(resumed) == 2 and list(resumed) == passes[1][1][1:] and resumed.step == 6
    x = torch.arange(n, dtype=torch.float64)[:, None]
    loader = DataLoader(TensorDataset(x), batch_sampler=disttrain.GlobalBatchSampler(n, b, seed=7, rank=2, world_size=3))
    first = next(iter(loader))[0]
    assert first[:, 0].long().tolist() == global_batch_indices(0, b, n, 7)[local_slice(b, 3, 2)].tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=10, global_batch_size=11), "global_batch_size 11 must be in \\[1, num_samples=10\\]"),
    (dict(rank=3, world_size=3), "rank 3 is not in \\[0, world_size=3\\)"),
    (dict(rank=0), "give both rank and world_size, or neither"),
    (dict(global_batch_size=2, rank=0, world_size=3), "cannot be split over 3 ranks"),
])
def test_global_batch_sampler_errors(kwargs, message):
    args = {"num_samples": 100, "global_batch_size": 31, **kwargs}
    with pytest.raises(ValueError, match=message):
        disttrain.GlobalBatchSampler(args.pop("num_samples"), args.pop("global_batch_size"), seed=0, **args)


def _sum_hook_count_and_clip(max_norm: float) -> dict:
    """On each of 3 ranks: stock DDP with the sum hook on an uneven slice (11, 10, 10 of 31), the loss summed and
    divided by global_count, then clip_grad_norm_ on the DDP model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sampler = disttrain.GlobalBatchSampler(31, 31, seed=0)  # rank and world size from the group
    ddp = nn.parallel.DistributedDataParallel(_model())
    disttrain.register_sum_hook(ddp)
    x, y = _batch()
    s = local_slice(31, world, rank)
    count = disttrain.global_count(s.stop - s.start)
    (((ddp(x[s]) - y[s]) ** 2).sum() / count).backward()
    grads = [p.grad.clone() for p in ddp.parameters()]
    norm = disttrain.clip_grad_norm_(ddp, max_norm)
    return {"sampler": (sampler.rank, sampler.world_size), "count": (int(count), count.dtype, count.device.type),
            "tensor_count": int(disttrain.global_count(torch.tensor(s.stop - s.start))), "grads": grads,
            "norm": norm, "clipped": [p.grad.clone() for p in ddp.parameters()]}


def test_sum_hook_global_count_and_clip_give_the_single_device_gradient(pools):
    grads, norm, clipped = _reference(max_norm=0.05)
    for rank, out in enumerate(pools(3).run(_sum_hook_count_and_clip, 0.05)):
        assert out["sampler"] == (rank, 3)
        assert out["count"] == (31, torch.int64, "cpu") and out["tensor_count"] == 31
        for ours, ref in zip(out["grads"], grads):
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
        assert isinstance(out["norm"], torch.Tensor) and float(out["norm"]) == pytest.approx(norm, rel=1e-12)
        assert norm > 0.05  # the clip did something
        for ours, ref in zip(out["clipped"], clipped):
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


def _fsdp_clip(max_norm: float) -> tuple[float, list[torch.Tensor]]:
    """fully_shard'ed model (DTensor gradients, 1/W per rank), every rank on the whole batch: FSDP's average is
    the single-device gradient, and clip_grad_norm_ needs the global norm of the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    x, y = _batch()
    ((model(x) - y) ** 2).sum(dim=1).mean().backward()
    norm = disttrain.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm), [p.grad.full_tensor() for p in model.parameters()]


def test_clip_grad_norm_of_sharded_gradients_is_the_global_norm(pools):
    _, norm, clipped = _reference(max_norm=0.05)
    for ours_norm, ours in pools(2).run(_fsdp_clip, 0.05):
        assert ours_norm == pytest.approx(norm, rel=1e-12)
        for g, ref in zip(ours, clipped):
            torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_clip_grad_norm_in_one_process_is_torchs_and_checks_its_arguments():
    a, b = _model(), _model()
    x, y = _batch()
    for m in (a, b):
        ((m(x) - y) ** 2).sum().backward()
    ours = disttrain.clip_grad_norm_(a, 0.1)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    assert isinstance(ours, torch.Tensor) and float(ours) == float(theirs)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    next(a.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="global gradient norm is nan"):
        disttrain.clip_grad_norm_(a, 0.1, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm and norm_type must be > 0"):
        disttrain.clip_grad_norm_(a, 0.0)


def test_register_sum_hook_needs_ddp_and_global_count_an_integer():
    with pytest.raises(TypeError, match="expects a torch DistributedDataParallel, got Sequential"):
        disttrain.register_sum_hook(_model())
    assert disttrain.global_count(5).item() == 5  # no process group: the local count
    with pytest.raises(ValueError, match="a count is one integer"):
        disttrain.global_count(torch.tensor(2.5))


def test_convert_sync_batchnorm_without_a_group_and_convert_dropout_keyed_by_sampler():
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    reference = copy.deepcopy(bn)
    converted = disttrain.convert_sync_batchnorm(bn)
    assert isinstance(converted[1], disttrain.SyncBatchNorm)
    x, _ = _batch(12)
    torch.testing.assert_close(converted(x), reference(x))  # no process group: plain batch norm
    # Dropout masks drawn from each sample's keys: the W=3 slices together give the W=1 output of the step.
    model = disttrain.convert_dropout(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5)).double())
    whole = disttrain.GlobalBatchSampler(12, 12, seed=3, rank=0, world_size=1)
    with disttrain.sample_keys(whole.keys(2)):
        expected = model(x)
    parts = []
    for r in range(3):
        sampler = disttrain.GlobalBatchSampler(12, 12, seed=3, rank=r, world_size=3)
        with disttrain.sample_keys(sampler.keys(2)):
            parts.append(model(x[sampler.slice]))
    torch.testing.assert_close(torch.cat(parts), expected, rtol=0, atol=0)
    assert (expected == 0).any()

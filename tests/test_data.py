"""Global-batch sharding: the union of the rank slices is the single-device batch, for any W <= B."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disttrain.config import ConfigError, DataConfig
from disttrain.data.batching import epoch_permutation, global_batch_indices, local_batch_size, local_slice
from disttrain.data.dataset import build_dataset
from disttrain.data.loader import GlobalBatches


@pytest.mark.parametrize("B, W", [(30, 4), (32, 2), (7, 7), (10, 3), (1, 1), (13, 5)])
def test_slices_tile_the_global_batch(B, W):
    sizes = [local_batch_size(B, W, r) for r in range(W)]
    assert sum(sizes) == B
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first B % W ranks get the extra sample
    slices = [local_slice(B, W, r) for r in range(W)]
    assert slices[0].start == 0 and slices[-1].stop == B
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_uneven_split_sizes_b30_w4():
    assert [local_batch_size(30, 4, r) for r in range(4)] == [8, 8, 7, 7]


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_union_equals_single_device_batch_no_duplicates(W):
    ds = build_dataset(DataConfig(num_samples=50), "mlp", seed=1, dtype=torch.float64)
    single = GlobalBatches(ds, 30, seed=1, rank=0, world_size=1)
    ranks = [GlobalBatches(ds, 30, seed=1, rank=r, world_size=W) for r in range(W)]
    for step in range(6):  # 6 * 30 = 180 samples: crosses three epoch boundaries of a 50-sample dataset
        union = np.concatenate([b.indices(step) for b in ranks])
        np.testing.assert_array_equal(union, single.indices(step))  # same samples, same order: no padding
        if (step * 30) // 50 == (step * 30 + 29) // 50:  # inside one epoch: every sample at most once
            assert len(set(union.tolist())) == 30
        x = torch.cat([b.batch(step, torch.device("cpu"))[0] for b in ranks])
        torch.testing.assert_close(x, single.batch(step, torch.device("cpu"))[0], rtol=0, atol=0)


def test_steps_walk_through_epoch_permutations():
    n, b, seed = 20, 8, 5
    stream = np.concatenate([epoch_permutation(n, seed, e) for e in range(3)])
    for step in range(7):
        np.testing.assert_array_equal(global_batch_indices(step, b, n, seed), stream[step * b:(step + 1) * b])
    for e in range(3):  # every epoch is a permutation: each sample exactly once
        assert sorted(epoch_permutation(n, seed, e).tolist()) == list(range(n))
    assert not np.array_equal(epoch_permutation(n, seed, 0), epoch_permutation(n, seed, 1))


def test_deterministic_across_runs_and_seeds():
    a = global_batch_indices(3, 16, 100, seed=7)
    np.testing.assert_array_equal(a, global_batch_indices(3, 16, 100, seed=7))
    assert not np.array_equal(a, global_batch_indices(3, 16, 100, seed=8))
    d1 = build_dataset(DataConfig(num_samples=64), "cnn", seed=3, dtype=torch.float32)
    d2 = build_dataset(DataConfig(num_samples=64), "cnn", seed=3, dtype=torch.float32)
    assert torch.equal(d1.x, d2.x) and torch.equal(d1.y, d2.y)


def test_dataset_shapes_and_dtypes():
    mlp = build_dataset(DataConfig(num_samples=40, num_classes=5), "mlp", seed=0, dtype=torch.float64)
    assert mlp.x.shape == (40, 32) and mlp.x.dtype == torch.float64 and mlp.num_classes == 5
    assert int(mlp.y.min()) >= 0 and int(mlp.y.max()) < 5 and len(mlp.y.unique()) > 1
    cnn = build_dataset(DataConfig(num_samples=40), "cnn", seed=0, dtype=torch.float32)
    assert cnn.input_shape == (3, 8, 8)


def test_digits_dataset_from_scikit_learn():
    pytest.importorskip("sklearn", reason="the digits dataset is the optional 'digits' extra")
    ds = build_dataset(DataConfig(name="digits", num_samples=100), "cnn", seed=0, dtype=torch.float32)
    assert ds.x.shape == (100, 1, 8, 8) and ds.num_classes == 10
    flat = build_dataset(DataConfig(name="digits", num_samples=100), "mlp", seed=0, dtype=torch.float32)
    assert flat.x.shape == (100, 64)
    torch.testing.assert_close(flat.x, ds.x.reshape(100, 64))


def test_digits_without_scikit_learn_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ConfigError, match=r"data\.name=digits needs scikit-learn: pip install 'disttrain\[digits\]'"):
        build_dataset(DataConfig(name="digits", num_samples=10), "mlp", seed=0, dtype=torch.float32)


def test_loader_workers_leave_no_semaphore_for_the_resource_tracker(monkeypatch):
    """In a rank started with spawn (as --nproc starts them), the loader's workers are still forked: their
    queues' semaphores are unlinked at once, so a rank killed while a run fails leaves none for the launcher's
    resource tracker to warn about (the warning was two lines after the run's one-line error)."""
    import multiprocessing
    import multiprocessing.resource_tracker

    registered: list[tuple[str, str]] = []
    monkeypatch.setattr(multiprocessing.resource_tracker, "register", lambda name, kind: registered.append((name, kind)))
    source = build_dataset(DataConfig(name="synthetic", num_samples=16), "mlp", 0, torch.float64)
    batches = GlobalBatches(source, 8, seed=0, rank=0, world_size=2, workers=1, prefetch=1)
    method = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)  # what a spawned rank's DataLoader would inherit
    try:
        (step, micro_batches), = batches.steps(0, 1, torch.device("cpu"), 1)
    finally:
        batches.close()
        multiprocessing.set_start_method(method, force=True)
    assert step == 0 and torch.equal(micro_batches[0][0], batches.batch(0, torch.device("cpu"))[0])
    assert [kind for _, kind in registered if kind == "semaphore"] == []

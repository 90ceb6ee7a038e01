"""W processes equal one process on the global batch: parameters after training, float64 and float32.

Each case trains the same config on a W-rank gloo pool and in this process with world size 1 (the
reference sees every global batch whole), then compares every tensor of the final state_dict.
"""

from __future__ import annotations

import pytest
import torch

from disttrain.config import load_config
from disttrain.verify.whole import TOLERANCE
from tests.common import max_rel_diff, reference, train_on_rank

STEPS = 12


def _overrides(out_dir: str, *extra: str) -> tuple[str, ...]:
    return ("train.global_batch_size=30", f"train.steps={STEPS}", "train.device=cpu", f"train.out_dir={out_dir}",
            "data.num_samples=90", *extra)


OPTIMIZERS = {
    "sgd": ("optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.weight_decay=0.0001"),
    "adamw": ("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.01"),
}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_float64_equivalence(pools, tmp_path, world_size, optimizer):
    overrides = _overrides(str(tmp_path / "ref"), "train.dtype=float64", *OPTIMIZERS[optimizer])
    ref_state, ref_losses = reference(overrides)
    cfg = load_config(None, [*overrides, f"train.out_dir={tmp_path / 'dist'}"])
    results = pools(world_size).run(train_on_rank, cfg.to_dict())
    for state, losses in results:  # every rank ends with the same model
        assert max_rel_diff(state, ref_state) <= 1e-10
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)
    # The run really trained: parameters moved far more than the tolerance.
    untrained = load_config(None, [*overrides, "train.steps=1", "optim.lr=1e-12"])
    assert max_rel_diff(train_on_rank(untrained.to_dict())[0], ref_state) > 1e-2


def test_float32_equivalence_within_documented_tolerance(pools, tmp_path):
    overrides = _overrides(str(tmp_path / "ref"), "train.dtype=float32", *OPTIMIZERS["sgd"])
    ref_state, _ = reference(overrides)
    cfg = load_config(None, [*overrides, f"train.out_dir={tmp_path / 'dist'}"])
    (state, _), *_ = pools(4).run(train_on_rank, cfg.to_dict())
    diff = max_rel_diff(state, ref_state)
    assert diff <= TOLERANCE["float32"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_ddp_path_equals_explicit_allreduce_path(pools, tmp_path, model):
    base = _overrides(str(tmp_path), "train.dtype=float64", f"model.name={model}", *OPTIMIZERS["sgd"])
    pool = pools(3)
    ddp = pool.run(train_on_rank, load_config(None, [*base, "comm.impl=ddp"]).to_dict())[0][0]
    # Tiny buckets: the explicit path then issues several all_reduces per step; the result must not change.
    explicit = pool.run(train_on_rank, load_config(None, [*base, "comm.impl=allreduce", "comm.bucket_mb=0.002"]
                                                   ).to_dict())[0][0]
    assert max_rel_diff(explicit, ddp) <= 1e-13
    assert max_rel_diff(ddp, reference(base)[0]) <= 1e-10


@pytest.mark.parametrize("world_size, batch", [(3, 31), (4, 30)])  # slices 11/10/10 and 8/8/7/7
def test_syncbn_uneven_split_is_equivalent_and_per_rank_bn_is_not(pools, tmp_path, world_size, batch):
    """SyncBN couples the ranks in backward (global sums of dy): exact only if every rank's loss has the
    same 1/B normalisation. Per-rank BatchNorm normalises each slice with its own statistics: not equal."""
    common = (*_overrides(str(tmp_path), "train.dtype=float64", "model.name=cnn", *OPTIMIZERS["sgd"]),
              f"train.global_batch_size={batch}")
    pool = pools(world_size)
    for norm, equivalent in (("syncbn", True), ("bn", False)):
        overrides = (*common, f"model.norm={norm}")
        (state, losses), *_ = pool.run(train_on_rank, load_config(None, list(overrides)).to_dict())
        ref_state, ref_losses = reference(overrides)
        diff = max_rel_diff(state, ref_state)  # includes running_mean / running_var
        if equivalent:
            assert diff <= 1e-10
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)
        else:
            assert diff > 1e-3

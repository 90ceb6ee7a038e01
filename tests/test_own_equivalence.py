"""W processes equal one process with per-sample randomness and with users' own models, float64.

Dropout masks and augmentations are drawn per sample (randomness.py), so they are the same however the
global batch is split over ranks and micro-batches; torch's nn.Dropout in the same place is not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from disttrain.config import load_config
from tests.common import max_rel_diff, reference, train_on_rank

ROOT = Path(__file__).resolve().parents[1]
F = "tests.factories"
STEPS = 20
# 60 samples, 20 per step (3 epochs): W=3 holds 7/7/6, W=2 10/10.
BASE = ("data.num_samples=60", "train.global_batch_size=20", f"train.steps={STEPS}", "train.dtype=float64",
        "train.device=cpu", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9")
RANDOM_CNN = (*BASE, "model.name=cnn", "model.hidden=8", "model.dropout=0.2", "data.augment=flip_crop")


def _run(pool, overrides: tuple[str, ...], tmp_path) -> tuple[dict, list[float]]:
    cfg = load_config(None, [*overrides, f"train.out_dir={tmp_path / 'dist'}"])
    results = pool.run(train_on_rank, cfg.to_dict())
    for state, _ in results[1:]:  # every rank ends with the same model
        assert max_rel_diff(state, results[0][0]) == 0
    return results[0]


def _ref(overrides: tuple[str, ...], tmp_path) -> tuple[dict, list[float]]:
    return reference((*overrides, f"train.out_dir={tmp_path / 'ref'}"))


class TorchDropout(nn.Dropout):
    """torch's own dropout where disttrain puts its per-sample one: each process draws from its own RNG."""


def train_with_torch_dropout(cfg_dict: dict):
    import disttrain.models.layers as models

    real = models.SampleDropout
    models.SampleDropout = TorchDropout
    try:
        return train_on_rank(cfg_dict)
    finally:
        models.SampleDropout = real


def test_dropout_and_augmentation_uneven_w3_match_one_device(pools, tmp_path):
    overrides = (*RANDOM_CNN, "model.norm=syncbn")
    ref_state, ref_losses = _ref(overrides, tmp_path)
    state, losses = _run(pools(3), overrides, tmp_path)
    assert max_rel_diff(state, ref_state) <= 1e-10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)
    # The randomness is real: without it the losses are others.
    plain = tuple(o for o in overrides if not o.startswith(("model.dropout", "data.augment")))
    plain_losses = torch.tensor(_ref(plain, tmp_path)[1])
    assert float((plain_losses - torch.tensor(ref_losses)).abs().max()) > 1e-2 * float(plain_losses.max())

    # torch's nn.Dropout in the same place: every rank draws its own masks, and the runs differ.
    cfg = load_config(None, [*overrides, f"train.out_dir={tmp_path / 'torch'}"])
    (torch_state, _), *_ = pools(3).run(train_with_torch_dropout, cfg.to_dict())
    torch_ref, _ = train_with_torch_dropout(load_config(None, [*overrides, f"train.out_dir={tmp_path / 'tr'}"]
                                                        ).to_dict())
    assert max_rel_diff(torch_state, torch_ref) > 1e-3


def test_accumulation_with_per_sample_randomness(pools, tmp_path):
    """W=3, 2 micro-batches per rank (4+3, 4+3, 3+3 samples) against one device on the whole batch: a sample's
    draws do not depend on the micro-batch that holds it. No batch norm (its statistics are per micro-batch)."""
    overrides = (*RANDOM_CNN, "model.norm=none")
    state, losses = _run(pools(3), (*overrides, "train.accumulation_steps=2"), tmp_path)
    ref_state, ref_losses = _ref(overrides, tmp_path)
    assert max_rel_diff(state, ref_state) <= 1e-10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)


RESNET = (*BASE, f"model.name={F}:tiny_resnet", "model.kwargs={width: 4, dropout: 0.2}", "model.norm=syncbn",
          f"data.name={F}:images", "data.num_classes=3", "data.augment=flip")


@pytest.mark.parametrize("world_size", [2, 3])
def test_residual_batchnorm_model_from_an_import_path(pools, tmp_path, world_size):
    """A model with residual blocks and BatchNorm from a factory, converted to SyncBN (and its dropout to
    per-sample dropout): W=2 (10/10) and W=3 (7/7/6) match one device."""
    state, losses = _run(pools(world_size), RESNET, tmp_path)
    ref_state, ref_losses = _ref(RESNET, tmp_path)
    assert any(k.endswith("running_var") for k in state)
    assert max_rel_diff(state, ref_state) <= 1e-10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)


def test_regression_with_mse_from_factories(pools, tmp_path):
    overrides = (*BASE, f"model.name={F}:regressor", f"data.name={F}:regression", "train.loss=mse",
                 "optim.lr=0.05")
    state, losses = _run(pools(2), overrides, tmp_path)
    ref_state, ref_losses = _ref(overrides, tmp_path)
    assert max_rel_diff(state, ref_state) <= 1e-10
    assert losses[-1] < 0.5 * losses[0]  # it learns


def test_own_model_example_config(pools, tmp_path):
    """configs/own_model.yaml (the README's `disttrain verify` example): the example ResNet with residual blocks,
    BatchNorm -> SyncBN, dropout and flip+crop, imported from examples/, at W=2 against one device."""
    overrides = ("train.steps=4", "train.device=cpu")
    cfg = load_config(ROOT / "configs" / "own_model.yaml", [*overrides, f"train.out_dir={tmp_path / 'dist'}"])
    assert cfg.model.name == "examples.resnet:resnet" and cfg.model.norm == "syncbn"
    (state, losses), _ = pools(2).run(train_on_rank, cfg.to_dict())
    ref_state, ref_losses = train_on_rank(load_config(ROOT / "configs" / "own_model.yaml",
                                                      [*overrides, f"train.out_dir={tmp_path / 'ref'}"]).to_dict())
    assert max_rel_diff(state, ref_state) <= 1e-10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)

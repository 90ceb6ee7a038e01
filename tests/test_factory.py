"""Users' own models and data by import path: building them, and a one-line exit-2 error for every bad path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from disttrain.cli.main import main
from disttrain.config import ConfigError
from disttrain.config import load_config
from disttrain.data.dataset import build_dataset
from disttrain.data.loader import GlobalBatches
from disttrain.parallel.env import distributed
from disttrain.factory import resolve
from disttrain.models.build import build_model
from disttrain.randomness import SampleDropout
from disttrain.parallel.syncbn import SyncBatchNorm
from disttrain.run.train import run

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
F = "tests.factories"
SMALL = ["data.num_samples=40", "train.global_batch_size=20"]

ERRORS = [
    # the path itself
    (["model.name=resnet"], r"model\.name: 'resnet' is neither one of mlp, cnn, gpt nor an import path "
                            r"'package\.module:function'"),
    (["data.name=tests/factories.py:images"], r"data\.name: 'tests/factories\.py:images' is neither one of "
                                              r"synthetic, digits, imagefolder, arrays, tokens nor an import path"),
    (["model.name=tests.no_such_module:f"], r"model\.name: cannot import 'tests\.no_such_module' \(from "
                                            r"'tests\.no_such_module:f'\): ModuleNotFoundError: No module named "
                                            r"'tests\.no_such_module'"),
    ([f"model.name={F}:missing"], r"model\.name: module 'tests\.factories' has no attribute 'missing' \(from "
                                  r"'tests\.factories:missing'\)"),
    ([f"data.name={F}:missing"], r"data\.name: module 'tests\.factories' has no attribute 'missing'"),
    ([f"model.name={F}:NOT_CALLABLE"], r"model\.name: 'tests\.factories:NOT_CALLABLE' is a int, not a callable"),
    # the model factory
    ([f"model.name={F}:raises"], r"model\.name: 'tests\.factories:raises' raised ValueError: width must be even$"),
    ([f"model.name={F}:tiny_resnet", "model.kwargs={depth: 2}"],
     r"model\.name: 'tests\.factories:tiny_resnet' raised TypeError: tiny_resnet\(\) got an unexpected keyword "
     r"argument 'depth'"),
    ([f"model.name={F}:not_a_module"], r"model\.name: 'tests\.factories:not_a_module' returned list, expected a "
                                       r"torch\.nn\.Module"),
    ([f"model.name={F}:wrong_width"], r"model\.name: 'tests\.factories:wrong_width' outputs shape \(2, 11\) for "
                                      r"inputs of shape \(2, 3, 8, 8\); expected \(2, 10\)"),
    ([f"model.name={F}:fails_in_forward"], r"model\.name: 'tests\.factories:fails_in_forward' failed on inputs of "
                                           r"shape \(2, 3, 8, 8\): RuntimeError: mat1 and mat2 shapes cannot be "
                                           r"multiplied"),
    # the data factory
    ([f"data.name={F}:not_data"], r"data\.name: 'tests\.factories:not_data' returned str; expected \(x, y\) "
                                  r"tensors or a map-style dataset of \(x, y\) pairs"),
    ([f"data.name={F}:too_few"], r"data\.name: 'tests\.factories:too_few' returned x of shape \(39, 2, 6, 6\) and "
                                 r"y of shape \(39,\); expected data\.num_samples=40 samples"),
    ([f"data.name={F}:float_labels"], r"returned y of dtype torch\.float64 and shape \(40,\); "
                                      r"train\.loss=cross_entropy needs integer class labels"),
    ([f"data.name={F}:labels_too_large", "data.num_classes=3"],
     r"data\.name: 'tests\.factories:labels_too_large' returned labels in \[2, 4\]; data\.num_classes=3 allows 0 "
     r"to 2"),
    ([f"data.name={F}:not_pairs"], r"returned a dataset whose item 0 is Tensor, not an \(x, y\) pair"),
    ([f"data.name={F}:images", "train.loss=mse"], r"train\.loss=mse needs float targets of shape \(N,\) or "
                                                  r"\(N, outputs\)"),
    ([f"data.name={F}:vectors", "model.name=cnn"], r"model\.name=cnn needs \(C, H, W\) images, got inputs of shape "
                                                   r"\(4,\)"),
    ([f"data.name={F}:vectors", "data.augment=flip"], r"data\.augment=flip needs images \(N, C, H, W\), but the "
                                                      r"inputs have shape \(40, 4\)"),
    ([f"data.name={F}:images", "data.kwargs={colour: 1}"], r"data\.name: 'tests\.factories:images' raised TypeError: "
                                                           r"images\(\) got an unexpected keyword argument 'colour'"),
    # keys that go with (or without) an import path
    ([f"model.name={F}:tiny_resnet", "model.dropout=0.1"], r"model\.dropout: applies to the built-in mlp and cnn"),
    (["model.kwargs={width: 4}"], r"model\.kwargs: only for a model factory or the gpt, not model\.name=cnn"),
    (["data.kwargs={size: 4}"], r"data\.kwargs: only for a data factory, not data\.name=synthetic"),
    (["model.kwargs=3"], r"model\.kwargs: expected a mapping of names to values, got 3"),
    (["model.dropout=1.0"], r"model\.dropout: must be in \[0, 1\), got 1\.0"),
    (["train.loss=mse"], r"train\.loss=mse needs float targets from a data factory; data\.name=synthetic has class"),
    (["model.name=mlp", "data.augment=crop"], r"data\.augment=crop needs images: data\.name=synthetic gives the mlp"),
    (["data.augment=crop", "data.crop_padding=0"], r"data\.crop_padding: must be >= 1, got 0"),
    (["train.loss=l1"], r"train\.loss: 'l1' is not one of cross_entropy, mse, token_cross_entropy"),
]


@pytest.mark.parametrize("overrides, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_paths_and_factories_are_one_line_exit_2(capsys, tmp_path, overrides, message):
    """Through the CLI's entry point, as `disttrain verify --nproc 2` runs it: every error is caught before a
    worker starts."""
    argv = ["verify", DEMO, "--nproc", "2", "--set", f"train.out_dir={tmp_path}"]
    for o in [*SMALL, *overrides]:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("disttrain: error: ")
    assert re.search(message, err.strip()), err


def test_bad_factory_through_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "disttrain", "verify", DEMO, "--nproc", "2", "--set", f"model.name={F}:wrong_width",
         "--set", f"train.out_dir={tmp_path}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "disttrain: error: model.name: 'tests.factories:wrong_width' outputs shape (2, 11) for inputs of shape "
        "(2, 3, 8, 8); expected (2, 10) (one output per sample and class/target, num_classes=10)")


def test_paths_resolve_from_the_current_directory(tmp_path, monkeypatch):
    """Like `python -m`: a module in the current directory imports, even when nothing put it on sys.path
    (the console script does not)."""
    (tmp_path / "user_models_cwd.py").write_text("def build(input_shape, num_classes):\n    return None\n")
    (tmp_path / "user_models_boom.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve("model.name", "user_models_cwd:build").__name__ == "build"
    assert sys.path[0] == str(tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.name: cannot import 'user_models_boom' \(from "
                                          r"'user_models_boom:f'\): RuntimeError: no GPU here$"):
        resolve("model.name", "user_models_boom:f")


def _build(overrides: list[str]):
    cfg = load_config(None, overrides)
    data = build_dataset(cfg.data, cfg.model.name, cfg.seed, torch.float64, loss=cfg.train.loss)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, torch.float64,
                        torch.device("cpu"), example=data.example())
    return data, model


def test_factory_model_is_seeded_converted_and_leaves_the_global_rng_alone():
    overrides = [f"model.name={F}:tiny_resnet", f"data.name={F}:images", "data.num_classes=3", *SMALL,
                 "model.kwargs={width: 3, dropout: 0.2}"]
    before = torch.random.get_rng_state()
    data, synced = _build([*overrides, "model.norm=syncbn"])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert data.x.shape == (40, 2, 6, 6) and data.x.dtype == torch.float64 and data.num_classes == 3
    kinds = [type(m) for m in synced.modules()]
    assert kinds.count(SyncBatchNorm) == 5 and nn.BatchNorm2d not in kinds
    assert nn.Dropout not in kinds and nn.Dropout2d not in kinds
    drops = [m for m in synced.modules() if isinstance(m, SampleDropout)]
    assert [(d.stream, d.channelwise, d.p) for d in drops] == [(1, True, 0.2), (2, False, 0.2)]
    _, local = _build([*overrides, "model.norm=bn"])
    assert [type(m) for m in local.modules()].count(nn.BatchNorm2d) == 5
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), local.state_dict().values()))
    _, other_seed = _build([*overrides, "seed=1"])
    assert not torch.equal(other_seed.stem[0].weight, synced.stem[0].weight)


def test_map_style_dataset_is_read_per_batch():
    as_tuple, _ = _build([f"data.name={F}:images", "data.num_classes=3", "model.name=cnn", *SMALL])
    as_items, _ = _build([f"data.name={F}:image_dataset", "data.num_classes=3", "model.name=cnn", *SMALL])
    everything = np.arange(len(as_tuple))
    assert not hasattr(as_items, "x")  # never materialised: items are read when a batch needs them
    x, y = as_items.fetch(everything)
    assert torch.equal(as_tuple.x, x) and torch.equal(as_tuple.y, y)


def test_mse_loss_is_torch_mse_on_the_global_batch(tmp_path):
    """A sample's loss is the mean squared error over its outputs: the logged loss is torch's mse_loss."""
    overrides = [f"data.name={F}:regression", "data.kwargs={outputs: 3}", f"model.name={F}:regressor",
                 "model.kwargs={dropout: 0.0}", "train.loss=mse", *SMALL]
    data, model = _build(overrides)
    assert data.y.shape == (40, 3) and data.y.dtype == torch.float64 and data.num_classes == 3
    x, y = GlobalBatches(data, 20, 0, 0, 1).batch(0, torch.device("cpu"))
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(x), y))
    cfg = load_config(None, [*overrides, "train.dtype=float64", "train.steps=1", "train.device=cpu",
                             f"train.out_dir={tmp_path}"])
    with distributed("cpu") as env:
        assert run(cfg, env, console=False).losses[0] == pytest.approx(expected, rel=1e-12)

"""The verdict itself, on hand-made run directories: metrics, tolerances, and what is not claimed."""

from __future__ import annotations

import json

import pytest
import torch

from disttrain.checkpoint.format import save_final
from disttrain.config import load_config
from disttrain.verify.whole import TOLERANCE, compare_runs, relative_difference


def make_run(path, weight: torch.Tensor, losses: list[float], cfg, world_size: int):
    path.mkdir(parents=True)
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weight)
    save_final(path / "final.pt", model, len(losses), cfg.to_dict(), world_size)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses)))


def test_relative_difference_uses_infinity_norms():
    assert relative_difference(torch.tensor([1.0, 1e-9]), torch.tensor([1.0, 2e-9])) == pytest.approx(1e-9)
    assert relative_difference(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_difference(torch.tensor([3.0]), torch.zeros(1)) == 3.0  # all-zero reference: absolute


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_verdict_at_the_tolerance(tmp_path, dtype):
    cfg = load_config(None, [f"train.dtype={dtype}"])
    tol = TOLERANCE[dtype]
    ref = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    make_run(tmp_path / "ref", ref, [2.0, 1.0], cfg, 1)
    make_run(tmp_path / "close", ref * (1 + 0.5 * tol), [2.0, 1.0], cfg, 3)
    make_run(tmp_path / "far", ref * (1 + 2 * tol), [2.0, 1.0], cfg, 3)
    close = compare_runs(cfg, tmp_path / "close", tmp_path / "ref")
    assert close.equivalent and close.world_size == 3 and close.max_param_rel_diff == pytest.approx(0.5 * tol)
    far = compare_runs(cfg, tmp_path / "far", tmp_path / "ref")
    assert not far.equivalent and far.worst_param == "weight"


def test_loss_curve_is_compared_relative_to_its_scale(tmp_path):
    """A converging loss near zero: per-step relative differences are meaningless there, the curve's is not."""
    cfg = load_config(None, ["train.dtype=float32"])
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    make_run(tmp_path / "ref", w, [2.0, 1e-9], cfg, 1)
    make_run(tmp_path / "dist", w, [2.0, 2e-9], cfg, 2)  # step 1 differs by 100% of itself, 5e-10 of the curve
    report = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref")
    assert report.max_loss_rel_diff == pytest.approx(5e-10) and report.equivalent
    make_run(tmp_path / "off", w, [2.0, 1.0], cfg, 2)
    assert not compare_runs(cfg, tmp_path / "off", tmp_path / "ref").equivalent


def test_unclaimed_config_is_never_equivalent(tmp_path):
    cfg = load_config(None, ["model.norm=bn", "train.accumulation_steps=2"])
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    make_run(tmp_path / "ref", w, [1.0], cfg, 1)
    make_run(tmp_path / "dist", w, [1.0], cfg, 2)
    report = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref")
    assert report.max_param_rel_diff == 0.0 and not report.claimed and not report.equivalent
    assert "batch-norm statistics are computed per micro-batch" in report.table()

"""Calibrated verdicts: the rounding twin's identity, each verdict, INCONCLUSIVE's exit code.

The twin (verify/twin.py) is the one-process reference with each global batch read in another order; in float64 it
must equal the reference to ~1e-15 for every model family, or its distance would not be rounding noise. Runs here
are one process, in this process (no worker pool needed): tiny models, float64, few steps.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from disttrain.config import load_config
from disttrain.parallel.env import distributed
from disttrain.run.train import run
from disttrain.verify import verdict as V
from disttrain.verify.twin import train_twin
from disttrain.verify.whole import RUN_TOLERANCE, compare_runs
from tests.test_verify import make_run

FAMILIES = {
    "mlp": ["model.name=mlp", "model.hidden=8"],
    "cnn-syncbn": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8"],
    "dropout-augment": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "model.dropout=0.3",
                        "data.augment=flip_crop"],
}


def _runs(tmp_path, overrides):
    cfg = load_config(None, [*overrides, "train.dtype=float64", "train.steps=4", "train.global_batch_size=13",
                             "data.num_samples=64", "train.device=cpu", "optim.lr=0.1",
                             f"train.out_dir={tmp_path / 'ref'}"])
    twin_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "twin")))
    with distributed("cpu", 60) as env:
        ref = run(cfg, env, console=False)
        twin = train_twin(twin_cfg, env)
    return ref, twin


@pytest.mark.parametrize("family", list(FAMILIES))
def test_twin_equals_the_reference_in_float64(tmp_path, family):
    ref, twin = _runs(tmp_path, FAMILIES[family])
    ref_state, twin_state = ref.model.state_dict(), twin.model.state_dict()
    worst = max(V.state_difference(twin_state, ref_state).values())
    assert worst < 1e-13, f"{family}: twin {worst:.1e} from the reference"
    assert V.curve_difference(twin.losses, ref.losses) < 1e-13
    # ... and it is another summation order, not the same computation: some rounding differs.
    assert worst > 0 or V.curve_difference(twin.losses, ref.losses) > 0


# --------------------------------------------------------------------------- the verdict on numbers


def test_each_verdict():
    floor = 1e-6
    quiet = V.judge("loss", 1e-5, 1e-5, floor)  # within C x noise, and the noise could show a mistake
    assert quiet.verdict == V.EQUIVALENT and V.overall([quiet]) == V.EQUIVALENT
    far = V.judge("loss", 2 * V.MARGIN * V.C * 1e-5, 1e-5, floor)  # beyond MARGIN x the bound
    assert far.verdict == V.NOT_EQUIVALENT and V.overall([quiet, far]) == V.NOT_EQUIVALENT
    between = V.judge("loss", 2 * V.C * 1e-5, 1e-5, floor)  # over the bound, under MARGIN x it
    assert between.verdict == V.INCONCLUSIVE and V.overall([quiet, between]) == V.INCONCLUSIVE
    assert "not by the" in V.inconclusive_line([quiet, between])
    # Noise so large that a known mistake could hide in it, in every quantity: inconclusive although within bounds.
    loud = [V.judge(q, V.SMALLEST_MISTAKE[q], V.SMALLEST_MISTAKE[q] / V.C, floor) for q in ("loss", "parameters")]
    assert all(j.verdict == V.EQUIVALENT for j in loud) and V.overall(loud) == V.INCONCLUSIVE
    line = V.inconclusive_line(loud)
    assert "rounding noise" in line and "smallest known mistake" in line and "\n" not in line
    # ... unless one quantity is quiet enough to show a mistake.
    assert V.overall([loud[1], V.judge("loss", 1e-5, 1e-5, floor)]) == V.EQUIVALENT
    # The floor: a twin that landed unusually close does not make a correct run fail.
    assert V.judge("parameters", 5e-7, 0.0, floor).verdict == V.EQUIVALENT
    # No twin: the fixed tolerance alone, with no margin (the uncalibrated check).
    assert V.judge("loss", 2e-6, None, floor).verdict == V.NOT_EQUIVALENT
    assert V.EXIT_CODES == {V.EQUIVALENT: 0, V.NOT_EQUIVALENT: 1, V.INCONCLUSIVE: 3}


def test_report_lines_and_json(tmp_path):
    """verify's lines keep their meaning; the noise, the floor and the verdict are added, and in --json."""
    cfg = load_config(None, ["train.dtype=float32", "train.precision=bf16"])
    w = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    make_run(tmp_path / "ref", w, [2.0, 1.0], cfg, 1)
    make_run(tmp_path / "twin", w * (1 + 1e-3), [2.0, 1.001], cfg, 1)
    make_run(tmp_path / "dist", w * (1 + 2e-3), [2.0, 1.002], cfg, 3)  # 2x the noise: within C x noise
    report = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref", tmp_path / "twin")
    assert report.verdict == V.EQUIVALENT and report.equivalent
    text = report.table()
    assert "max relative loss difference:      1.000e-03" in text
    assert "max relative parameter difference: 2.000e-03 (weight)" in text
    assert "rounding noise (reference vs twin): loss 5.000e-04, parameters 1.000e-03" in text
    assert f"floor (bf16, float32 weights): {V.FLOOR['bf16']:.0e}" in text
    assert text.splitlines()[-1].startswith("verdict: EQUIVALENT: 3 processes match")
    data = json.loads(report.to_json())
    assert data["verdict"] == "EQUIVALENT" and data["param_noise"] == pytest.approx(1e-3)
    assert data["floor"] == V.FLOOR["bf16"] and data["calibrated"] is True
    make_run(tmp_path / "off", w * 1.5, [2.0, 1.5], cfg, 3)
    assert compare_runs(cfg, tmp_path / "off", tmp_path / "ref", tmp_path / "twin").verdict == V.NOT_EQUIVALENT
    # Without a twin: the fixed tolerance (RUN_TOLERANCE), said so.
    plain = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref")
    assert plain.floor == RUN_TOLERANCE["bf16"] and plain.equivalent and "uncalibrated" in plain.table()


def test_inconclusive_has_its_own_exit_code(tmp_path, monkeypatch, capsys):
    from disttrain.cli.main import main
    from disttrain.verify import whole

    cfg = load_config(None, ["train.dtype=float32"])
    w = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    make_run(tmp_path / "ref", w, [2.0, 1.0], cfg, 1)
    make_run(tmp_path / "twin", w * 1.1, [2.0, 1.1], cfg, 1)  # rounding as large as a mistake
    make_run(tmp_path / "dist", w * 1.05, [2.0, 1.05], cfg, 2)
    report = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref", tmp_path / "twin")
    assert report.verdict == V.INCONCLUSIVE and not report.equivalent
    monkeypatch.setattr(whole, "verify", lambda *args, **kwargs: report)
    (tmp_path / "c.yaml").write_text(f"train: {{out_dir: {tmp_path / 'out'}, dtype: float32}}\n")
    assert main(["verify", str(tmp_path / "c.yaml"), "--nproc", "1"]) == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verdict: INCONCLUSIVE: the run's own rounding noise is")


def test_uncalibrated_flag_skips_the_twin(tmp_path, monkeypatch):
    from disttrain.cli.main import main
    from disttrain.verify import whole

    seen = {}

    def fake_verify(cfg, nproc, against=None, twin=True):
        seen["twin"] = twin
        raise whole.ConfigError("stop here")

    monkeypatch.setattr(whole, "verify", fake_verify)
    (tmp_path / "c.yaml").write_text(f"train: {{out_dir: {tmp_path / 'out'}}}\n")
    assert main(["verify", str(tmp_path / "c.yaml"), "--nproc", "1", "--uncalibrated"]) == 2 and seen == {"twin": False}
    assert main(["verify", str(tmp_path / "c.yaml"), "--nproc", "1"]) == 2 and seen == {"twin": True}


def test_bf16_twin_rounds_like_w_processes(tmp_path):
    """Under bf16 autocast the twin's weight gradients are W partial sums, each rounded to bf16 as a rank's is: its
    distance from the reference is of bf16's order, not the float32 accumulator's (reordering alone: ~1e-7)."""
    cfg = load_config(None, ["model.name=mlp", "model.hidden=8", "train.dtype=float32", "train.precision=bf16",
                             "train.steps=2", "train.global_batch_size=31", "data.num_samples=64", "train.device=cpu",
                             f"train.out_dir={tmp_path / 'ref'}"])
    twin_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "twin")))
    with distributed("cpu", 60) as env:
        ref = run(cfg, env, console=False)
        twin = train_twin(twin_cfg, env, chunks=3)
    noise = max(V.state_difference(twin.model.state_dict(), ref.model.state_dict()).values())
    assert 1e-5 < noise < 1e-1, noise

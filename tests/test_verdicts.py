"""Calibrated verdicts: the reference's and the twin's identity, each verdict, INCONCLUSIVE's exit code.

verify's reference reads each global batch as the W ranks do and runs its Linear/Conv layers slice by slice
(verify/twin.py, chunked.py); its twin also reorders each rank's samples. In float64 both must equal one process
running every op on the whole batch to ~1e-15 for every model family, or their distances would not be rounding
noise. Runs here are one process, in this process (no worker pool needed): tiny models, float64, few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from disttrain.config import load_config
from disttrain.data.batching import local_slice, rank_parts, within_batch_order
from disttrain.data.loader import GlobalBatches
from disttrain.parallel.env import distributed
from disttrain.run.build import build_data
from disttrain.run.train import run
from disttrain.verify import verdict as V
from disttrain.parallel import compile as compile_module
from disttrain.verify.mistakes import AsMistake
from disttrain.verify.twin import RANK_ORDER, SAMPLE_ORDER, TWINS, train_reference
from disttrain.verify.whole import RUN_TOLERANCE, compare_runs
from tests.test_verify import make_run

GPT = ["model.name=gpt", "model.hidden=16", "model.kwargs={layers: 1, heads: 2}", "train.loss=token_cross_entropy",
       "data.name=disttrain.bench.sequences:padded_sequences", "data.num_classes=256", "data.kwargs={seq_len: 8}"]
FAMILIES = {
    "mlp": ["model.name=mlp", "model.hidden=8"],
    "mlp-accumulation": ["model.name=mlp", "model.hidden=8", "train.accumulation_steps=2"],
    "cnn-syncbn": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8"],
    "dropout-augment": ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "model.dropout=0.3",
                        "data.augment=flip_crop"],
    "gpt-tokens-accumulation": [*GPT, "train.accumulation_steps=2"],
}


def _config(tmp_path, name, overrides):
    return load_config(None, [*overrides, "train.dtype=float64", "train.steps=4", "train.global_batch_size=13",
                              "data.num_samples=64", "train.device=cpu", "optim.lr=0.1",
                              f"train.out_dir={tmp_path / name}"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_and_twins_equal_one_op_per_layer_in_float64(tmp_path, family):
    """Read as 3 ranks (B=13: slices 5/4/4), slice by slice, with the ranks' parts reversed (the twin) or each rank's
    samples reordered (the second twin): the same training as one process running each op on the whole batch, to
    rounding."""
    with distributed("cpu", 60) as env:
        plain = run(_config(tmp_path, "plain", FAMILIES[family]), env, console=False)
        ref = train_reference(_config(tmp_path, "ref", FAMILIES[family]), env, 3)
        twins = {kind: train_reference(_config(tmp_path, kind.replace(" ", "-"), FAMILIES[family]), env, 3, kind)
                 for kind in TWINS}
    for name, other in (("reference", ref), *twins.items()):
        worst = max(V.state_difference(other.model.state_dict(), plain.model.state_dict()).values())
        assert worst < 1e-13, f"{family}: the {name} is {worst:.1e} from one op per layer"
        assert V.curve_difference(other.losses, plain.losses) < 1e-13
    # ... and the second twin is another summation order, not the same computation: some rounding differs.
    second = twins[SAMPLE_ORDER]
    noise = max(V.state_difference(second.model.state_dict(), ref.model.state_dict()).values())
    assert noise > 0 or V.curve_difference(second.losses, ref.losses) > 0


@pytest.mark.parametrize("batch, ranks, k", [(31, 3, 2), (13, 4, 3), (8, 2, 4), (7, 3, 2), (13, 3, 1)])
def test_read_as_ranks_holds_each_ranks_micro_batches(batch, ranks, k):
    """One process reading the global batch as ``ranks`` ranks: micro-batch j is the ranks' j-th micro-batches, rank
    r's part where batching.rank_parts puts it (what chunked.py runs alone), samples and keys, in rank order or
    reversed (the twin); the second twin's order moves samples only within a rank's slice."""
    dataset = build_data(load_config(None, ["model.name=cnn", "data.num_samples=64", "data.augment=flip_crop"]))
    rank_batches = [GlobalBatches(dataset, batch, seed=3, rank=r, world_size=ranks) for r in range(ranks)]
    for rank_order in (None, tuple(reversed(range(ranks)))):
        one = GlobalBatches(dataset, batch, seed=3, rank=0, world_size=1)
        one.ranks, one.rank_order = ranks, rank_order
        for step in (0, 5):
            micro = one.keyed_micro_batches(step, torch.device("cpu"), k)
            per_rank = [b.keyed_micro_batches(step, torch.device("cpu"), k) for b in rank_batches]
            for j, (x, y, keys) in enumerate(micro):
                for r, part in rank_parts(len(y), ranks, rank_order):
                    rx, ry, rkeys = per_rank[r][j]
                    assert torch.equal(x[part], rx) and torch.equal(y[part], ry)
                    assert torch.equal(keys.positions[part], rkeys.positions)
    order = within_batch_order(1, 5, batch, ranks)
    for r in range(ranks):
        part = local_slice(batch, ranks, r)
        assert sorted(order[part]) == list(range(part.start, part.stop))
    assert not np.array_equal(order, np.arange(batch))


def test_second_twin_before_any_verdict_but_equivalent():
    """Within the first twin's bound: EQUIVALENT on its word. Beyond it: the second twin is wanted, and the larger
    of the two noises decides."""
    first = {"loss": 2e-7, "parameters": 0.0}
    floor = 1e-6
    assert not V.judge_pair(1e-7, 5e-7, V.calibrated_noise(first), floor).wants_second_twin
    beyond = V.judge_pair(1e-7, 4e-6, V.calibrated_noise(first), floor)
    assert beyond.verdict == V.INCONCLUSIVE and beyond.wants_second_twin
    noises = V.calibrated_noise(first, {"loss": 1e-7, "parameters": 3e-6})
    assert noises == {"loss": 2e-7, "parameters": 3e-6}
    again = V.judge_pair(1e-7, 4e-6, noises, floor, second_twin=True)
    assert again.verdict == V.EQUIVALENT and not again.wants_second_twin
    assert V.calibrated_noise(None) == {"loss": None, "parameters": None}


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
    # A mistake twin within the bound of every quantity: the run could not have told it apart, so INCONCLUSIVE
    # although within bounds; one quantity beyond its bound is enough, and that one decided.
    quiet_params = V.judge("parameters", 1e-5, 1e-5, floor)
    hidden = V.Mistake("comm.reduce=avg", loss=3e-5, parameters=3e-5)
    assert V.overall([quiet, quiet_params], [hidden]) == V.INCONCLUSIVE
    line = V.inconclusive_line([quiet, quiet_params], [hidden])
    assert "could hide comm.reduce=avg" in line and "\n" not in line
    seen = V.Mistake("comm.reduce=avg", loss=3e-5, parameters=1e-3)
    assert V.overall([quiet, quiet_params], [seen]) == V.EQUIVALENT
    decided = V.decided_line([quiet, quiet_params], [seen])
    assert "decided by parameters" in decided and "the loss is blind" in decided
    # A mistake that leaves this run's numbers unchanged (avg on an even split) need not be told apart.
    assert V.overall([quiet, quiet_params], [V.Mistake("comm.reduce=avg", 0.0, 0.0, acted=False)]) == V.EQUIVALENT
    # A float64 twin 1e-1 from its reference is not rounding: no verdict, and the bound is not widened to it.
    loud = V.judge("parameters", 0.3, 1e-1, 1e-10, V.CEILING["float64"])
    assert loud.not_rounding and V.overall([quiet, loud]) == V.INCONCLUSIVE
    assert "beyond the 1e-06 that rounding reaches" in V.inconclusive_line([quiet, loud])
    assert V.overall([quiet, V.judge("parameters", 100.0, 1e-1, 1e-10, V.CEILING["float64"])]) == V.INCONCLUSIVE
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


def test_verify_trains_the_second_twin_only_beyond_the_first_bound(tmp_path, monkeypatch):
    """verify(): the reference and the rank-order twin always; the sample-order twin only when the run is beyond the
    first twin's bound, and then the larger noise decides (here: EQUIVALENT after all)."""
    from disttrain.verify import mistakes, whole

    w = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    trained = []
    scale = {None: 1.0, "rank order": 1 + 1e-6, "sample order": 1 + 1e-3}

    def fake_launch(cfg, nproc, console=True):
        make_run(Path(cfg.train.out_dir), w * scale["distributed"], [2.0, 1.0], cfg, nproc)

    def fake_reference(cfg, env, ranks, twin=None, hooks=(), **kwargs):
        trained.append("mistake" if any(isinstance(h, AsMistake) for h in hooks) else twin)
        make_run(Path(cfg.train.out_dir), w * scale[twin], [2.0, 1.0], cfg, 1)

    monkeypatch.setattr(whole, "launch_local", fake_launch)
    monkeypatch.setattr(whole, "train_reference", fake_reference)
    monkeypatch.setattr(mistakes, "train_reference", fake_reference)
    cfg = load_config(None, ["train.dtype=float32", f"train.out_dir={tmp_path}"])
    for run_scale, second in ((1 + 2e-3, True), (1 + 2e-6, False)):
        trained.clear()
        scale["distributed"] = run_scale
        for name in ("distributed", "reference", "twin"):  # make_run writes into a new directory
            shutil.rmtree(tmp_path / name, ignore_errors=True)
        report = whole.verify(cfg, 2)
        # ... then, within the bounds, the mistake twins (here: reduce=sum, the one that applies to B=32 over 2)
        assert trained == [None, "rank order", *(["sample order"] if second else []), "mistake"]
        assert report.second_twin == second and report.verdict == V.EQUIVALENT
        assert ("the larger of two twins" in report.table()) == second
        assert (tmp_path / "twin2").exists() == second  # an earlier verify's second twin is not left to mislead


def test_inconclusive_has_its_own_exit_code(tmp_path, monkeypatch, capsys):
    from disttrain.cli.main import main
    from disttrain.verify import whole

    cfg = load_config(None, ["train.dtype=float32"])
    w = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    make_run(tmp_path / "ref", w, [2.0, 1.0], cfg, 1)
    make_run(tmp_path / "twin", w * 1.1, [2.0, 1.1], cfg, 1)  # rounding as large as a mistake
    make_run(tmp_path / "dist", w * 1.05, [2.0, 1.05], cfg, 2)
    hidden = V.Mistake("comm.reduce=sum", loss=0.2, parameters=0.2)  # within the bounds (0.4): hidden by the noise
    report = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref", tmp_path / "twin", mistakes=[hidden])
    assert report.verdict == V.INCONCLUSIVE and not report.equivalent
    monkeypatch.setattr(whole, "verify", lambda *args, **kwargs: report)
    (tmp_path / "c.yaml").write_text(f"train: {{out_dir: {tmp_path / 'out'}, dtype: float32}}\n")
    assert main(["verify", str(tmp_path / "c.yaml"), "--nproc", "1"]) == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verdict: INCONCLUSIVE: the run's own rounding noise could hide comm.reduce=sum")


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


def test_bf16_reference_rounds_like_w_processes(tmp_path):
    """Under bf16 autocast the reference's weight gradients are W partial sums, each rounded to bf16 as a rank's is:
    it is a bf16 rounding away from one op on the whole batch (reordering alone would be ~1e-7 away), and its twins,
    the same partial sums in another order, are closer to it than that."""
    bf16 = ["model.name=mlp", "model.hidden=8", "train.dtype=float32", "train.precision=bf16", "train.steps=2",
            "train.global_batch_size=31", "data.num_samples=64", "train.device=cpu"]
    with distributed("cpu", 60) as env:
        plain = run(load_config(None, [*bf16, f"train.out_dir={tmp_path / 'plain'}"]), env, console=False)
        ref = train_reference(load_config(None, [*bf16, f"train.out_dir={tmp_path / 'ref'}"]), env, 3)
        twins = [train_reference(load_config(None, [*bf16, f"train.out_dir={tmp_path / str(i)}"]), env, 3, kind)
                 for i, kind in enumerate(TWINS)]
    partition = max(V.state_difference(ref.model.state_dict(), plain.model.state_dict()).values())
    assert 1e-5 < partition < 1e-1, partition
    for twin in twins:
        noise = max(V.state_difference(twin.model.state_dict(), ref.model.state_dict()).values())
        assert noise < partition / 10, (noise, partition)


@pytest.mark.skipif(compile_module.cpp_compiler() is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_reference_and_twin_equal_one_process_in_float64(tmp_path):
    """train.compile: the reference and then its twin of a CNN in one process (the same compiled code for two slice layouts,
    as configs/demo.yaml at W=2) compile static graphs and stay within 1e-10 of an uncompiled one-process run
    (automatic dynamic shapes made inductor fail on the twin: ``cannot determine truth value of Relational``)."""
    cnn = ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "train.steps=2", "train.global_batch_size=30", "data.num_samples=64",
           "train.dtype=float64", "train.device=cpu", "optim.lr=0.2"]
    with distributed("cpu", 60) as env:
        plain = run(load_config(None, [*cnn, f"train.out_dir={tmp_path / 'plain'}"]), env, console=False)
        compiled = [train_reference(load_config(None, [*cnn, "train.compile=true",
                                                       f"train.out_dir={tmp_path / str(twin)}"]), env, 2, twin)
                    for twin in (None, RANK_ORDER)]
    for other in compiled:
        assert max(V.state_difference(other.model.state_dict(), plain.model.state_dict()).values()) <= 1e-10
        assert V.curve_difference(other.losses, plain.losses) <= 1e-10
    assert torch._dynamo.config.automatic_dynamic_shapes  # restored after each run


def test_stepwise_a_mistake_seen_in_one_segment_is_seen_by_the_run():
    """Segment 2's bounds hide comm.reduce=sum, segment 1's showed it: the run would have shown the mistake, so
    segment 2 counts as EQUIVALENT; a mistake no segment told apart keeps the run INCONCLUSIVE."""
    from disttrain.verify.report import Segment, settle_sensitivity

    def segment(start, verdict, hidden="", seen=()):
        return Segment(start=start, stop=start + 1, world_size=2, param_rel_diff=0.0, worst_param="w",
                       loss_rel_diff=0.0, optimizer_rel_diff=0.0, tolerance=1e-6, passed=True, verdict=verdict,
                       hidden=hidden, seen=seen, why="hidden" if hidden else "")

    segments = [segment(0, V.EQUIVALENT, seen=("comm.reduce=sum",)), segment(1, V.INCONCLUSIVE, "comm.reduce=sum")]
    settle_sensitivity(segments)
    assert [s.verdict for s in segments] == [V.EQUIVALENT, V.EQUIVALENT]
    segments = [segment(0, V.EQUIVALENT, seen=("comm.reduce=sum",)), segment(1, V.INCONCLUSIVE, "comm.reduce=avg")]
    settle_sensitivity(segments)
    assert V.combine(s.verdict for s in segments) == V.INCONCLUSIVE

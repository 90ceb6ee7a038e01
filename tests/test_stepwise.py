"""Step-wise verification: a long float32 run that whole-run verify cannot judge verifies segment by segment; every
broken run fails at the first segment its mistake touches; resized and torchrun runs verify; user errors are one
line, exit 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disttrain.checkpoint.format import checkpoint_path, list_checkpoints
from disttrain.cli.main import main as cli_main
from disttrain.config import load_config
from disttrain.parallel.env import distributed
from disttrain.verify.stepwise import Segment, summarize, tolerance, verify_stepwise
from disttrain.verify.twin import train_reference
from disttrain.verify.whole import compare_runs
from tests.stepwise_runs import train_run
from tests.common import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# The example of docs/verification.md: a small MLP at lr 0.3 with clipping and weight decay never quite fits (loss ~1e-2) and
# stays chaotic, so float32 rounding differences between processes grow to order 1 over its 1,000 steps.
# Checkpoints every 10 steps, all kept.
CHAOTIC = ROOT / "configs" / "stepwise.yaml"
LONG_STEPS = 1000


def _cfg(overrides: list[str], out_dir: Path, *extra: str):
    return load_config(CHAOTIC, ["train.device=cpu", "train.log_every=100000", *overrides, f"train.out_dir={out_dir}",
                                 *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The reference runs in this process; tiny models gain nothing from intra-op threads, and on a busy machine
    # spinning OpenMP threads make them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_run(pools, tmp_path_factory):
    """1,000 float32 steps with 2 processes (checkpoints every 10 steps); one process running each op on the whole
    batch; and verify's one-process reference, which reads each batch as the 2 ranks do (verify/twin.py)."""
    root = tmp_path_factory.mktemp("long")
    cfg = _cfg([], root / "run")
    assert cfg.train.steps == LONG_STEPS and cfg.train.dtype == "float32" and cfg.train.checkpoint_every == 10
    pools(2).run(train_run, cfg.to_dict())
    train_run(_cfg([], root / "one-op", "train.checkpoint_every=0").to_dict())
    with distributed("cpu", 60) as env:
        train_reference(_cfg([], root / "reference", "train.checkpoint_every=0"), env, 2)
    return cfg, root


def test_long_float32_run_verifies_stepwise_and_against_the_ranks_rounding(long_run):
    """Rounding grows to order 1 over the 1,000 chaotic steps: a one-process run with one op per layer ends far from
    the 2-process run. verify's reference rounds as the 2 ranks do (their partial sums, added in an order that
    commutes) and ends with the same parameters; step-wise verification holds segment by segment either way. (With
    3 processes, docs/verification.md, the whole run is INCONCLUSIVE: 3 partial sums do not commute.)"""
    cfg, root = long_run
    one_op = compare_runs(cfg, root / "run", root / "one-op")
    assert not one_op.equivalent and one_op.max_param_rel_diff > 1e-2, one_op.max_param_rel_diff
    whole = compare_runs(cfg, root / "run", root / "reference")  # what `verify --against` compares
    assert whole.equivalent and whole.max_param_rel_diff <= 1e-6, whole.max_param_rel_diff

    # The fixed tolerances alone (no twins: half the retraining); the calibrated verdicts: tests/test_verdicts.py.
    report = verify_stepwise(cfg, root / "run", twin=False)
    assert report.equivalent and report.first_failure is None, report.table()
    assert [(s.start, s.stop) for s in report.segments] == [(s, s + 10) for s in range(0, LONG_STEPS, 10)]
    assert all(s.world_size == 2 and s.tolerance == tolerance("float32", 10) for s in report.segments)
    worst = report.worst
    assert max(worst.param_rel_diff, worst.loss_rel_diff) * 100 <= worst.tolerance, report.table()
    assert report.margin >= 100 and report.steps == LONG_STEPS
    assert "verdict: EQUIVALENT" in report.table() and "first segment over its bound: none" in report.table()


@pytest.mark.parametrize("name, overrides, skip, first", [
    ("reduce=sum", ["comm.reduce=sum"], None, (0, 10)),
    ("per-rank bn", ["model.norm=bn"], None, (0, 10)),
    # max_norm below every rank's gradient norm from step 0, so that the wrong order acts at once.
    ("clip before average", ["clip.before_average=true", "comm.impl=allreduce", "clip.max_norm=0.1"], None, (0, 10)),
    ("rank 0 drops step 23's all_reduce", ["comm.impl=allreduce"], (0, 23), (20, 30)),
])
def test_broken_run_fails_at_its_first_segment(pools, tmp_path, name, overrides, skip, first):
    cfg = _cfg(overrides, tmp_path, "train.steps=30")
    pools(2).run(train_run, cfg.to_dict(), skip=skip)
    report = verify_stepwise(cfg, tmp_path)
    assert not report.equivalent
    failed = report.first_failure
    assert (failed.start, failed.stop) == first, report.table()
    assert failed.ratio >= 10, report.table()  # beyond the margin: NOT EQUIVALENT
    assert all(s.passed for s in report.segments if s.stop <= first[0])  # correct before the mistake
    assert f"first segment over its bound: steps {first[0]} -> {first[1]}" in report.table()
    assert "verdict: NOT EQUIVALENT" in report.table()


def test_resized_run_verifies_stepwise(pools, tmp_path):
    """SyncBN CNN, float64: W=2 for steps 0-4, then 3, 1 and 2 processes; every segment within tolerance."""
    cfg = load_config(None, ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "train.global_batch_size=14",
                             "data.num_samples=56", "train.dtype=float64", "train.device=cpu", "train.steps=16",
                             "train.checkpoint_every=4", "train.keep_checkpoints=0", "schedule.warmup=linear",
                             "schedule.warmup_steps=3", "schedule.decay=cosine", "clip.mode=norm",
                             "clip.max_norm=0.5", "optim.lr=0.2", f"train.out_dir={tmp_path}"])
    for i, (world_size, until) in enumerate([(2, 4), (3, 8), (1, 12), (2, None)]):
        run = pools(world_size).run if world_size > 1 else lambda fn, *a: [fn(*a)]
        run(train_run, cfg.to_dict(), i > 0, until)
    report = verify_stepwise(cfg, tmp_path)
    assert report.equivalent, report.table()
    assert [(s.start, s.stop, s.world_size) for s in report.segments] == [
        (0, 4, 2), (4, 8, 3), (8, 12, 1), (12, 16, 2)]
    assert report.margin >= 100 and all(s.param_rel_diff <= 1e-13 for s in report.segments)


def test_torchrun_float32_run_verifies_stepwise_against_float64_in_2_jobs(tmp_path, capsys):
    run_dir = tmp_path / "torchrun"
    sets = ["--set", f"train.out_dir={run_dir}", "--set", "train.device=cpu", "--set", "train.steps=6",
            "--set", "train.dtype=float32",
            "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=0", "--set", "model.hidden=8"]
    trained = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "disttrain", "train", str(DEMO), *sets],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr
    code = cli_main(["verify", str(DEMO), "--against", str(run_dir), "--stepwise", "--reference-dtype", "float64",
                     "--jobs", "2", "--json", *sets])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert report["equivalent"] and report["reference_dtype"] == "float64" and report["jobs"] == 2
    assert [(s["start"], s["stop"], s["world_size"]) for s in report["segments"]] == [(0, 2, 2), (2, 4, 2), (4, 6, 2)]
    assert report["margin"] >= 100 and report["first_failure"] is None
    # The segments are independent: two processes compute exactly what one does.
    alone = verify_stepwise(load_config(str(DEMO), sets[1::2]), run_dir, "float64")
    assert [s.param_rel_diff for s in alone.segments] == [s["param_rel_diff"] for s in report["segments"]]


def test_report_notes_segments_too_long_to_separate_and_exact_runs():
    def segments(k: int, error: float) -> list[Segment]:
        return [Segment(s, s + k, 2, error, "w", 0.0, 0.0, tolerance("float32", k), True) for s in (0, k)]

    cfg = load_config(CHAOTIC)
    short = summarize(cfg, Path("run"), segments(10, 1e-6), "float32", "cpu", 1.0, 1, calibrated=False)
    assert short.note == "" and short.margin == pytest.approx(1000) and short.equivalent
    long = summarize(cfg, Path("run"), segments(50, 0.0), "float32", "cpu", 1.0, 1, calibrated=False)
    assert "segments of up to 50 float32 steps" in long.note and "note: segments of up to 50" in long.table()
    assert json.loads(long.to_json())["margin"] is None and "(margin exact)" in long.table()


# --------------------------------------------------------------------------- user errors: one line, exit 2

def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_stepwise_user_errors_are_one_line_exit_2(capsys, tmp_path):
    small = ["train.steps=6", "train.checkpoint_every=2"]
    good, pruned, bare = tmp_path / "good", tmp_path / "pruned", tmp_path / "bare"
    train_run(_cfg(small, good).to_dict())
    train_run(_cfg(small, pruned, "train.keep_checkpoints=2").to_dict())  # keeps steps 4 and 6
    train_run(_cfg(small, bare, "train.checkpoint_every=0").to_dict())
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_cfg(small, tmp_path / "unused").to_dict()))

    def verify(run_dir: Path, *extra: str) -> tuple[int, str]:
        return _cli(capsys, "verify", str(config), "--against", str(run_dir), "--stepwise", *extra)

    broken, renamed, unlogged = tmp_path / "broken", tmp_path / "renamed", tmp_path / "unlogged"
    for copy in (broken, renamed, unlogged):
        shutil.copytree(good, copy)
    path = checkpoint_path(broken, 4)
    path.write_bytes(path.read_bytes()[:300])
    checkpoint_path(renamed, 6).write_bytes(checkpoint_path(renamed, 4).read_bytes())
    metrics = unlogged / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:3]))
    cases = [
        (_cli(capsys, "verify", str(config), "--stepwise"), "verify --stepwise needs --against RUN_DIR"),
        (_cli(capsys, "verify", str(config), "--reference-dtype", "float64"),
         "--reference-dtype and --jobs need --stepwise"),
        (verify(tmp_path / "nothing"), "no such directory"),
        (verify(bare), "no checkpoints in"),
        (verify(pruned), "no checkpoint between steps 0 and 4 (written every 2 steps): train.keep_checkpoints=2 "
                         "deleted the older ones"),
        (verify(broken), f"--against: {path}: unreadable"),
        (verify(good, "--set", "optim.lr=0.2"), "step_00000002.pt was trained with a different config "
                                                  "(optim.lr differ)"),
        (verify(good, "--jobs", "0"), "--jobs: must be >= 1, got 0"),
        (verify(renamed), f"--against: {checkpoint_path(renamed, 6)}: holds step 4, not 6"),
        (verify(unlogged), "metrics.jsonl has no record of step 3"),
        (verify(good, "--set", "train.steps=4"), "the run has a checkpoint at step 6, beyond train.steps=4"),
    ]
    for (code, err), message in cases:
        assert code == 2 and message in err and len(err.splitlines()) == 1, (message, err)
    assert "train.checkpoint_every > 0 and train.keep_checkpoints: 0" in cases[3][0][1]
    (unlogged / "metrics.jsonl").unlink()
    code, err = verify(unlogged)
    assert code == 2 and err.endswith("no metrics.jsonl there"), err
    code, err = verify(good)  # the same directory, intact: verifies
    assert code == 0, err
    assert [s for s, _ in list_checkpoints(good)] == [2, 4, 6]

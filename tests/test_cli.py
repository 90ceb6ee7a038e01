"""End to end through the command line, as users run it: verify, train --nproc, torchrun, dead peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from disttrain.cli.main import main as cli_main
from disttrain.verify.whole import relative_difference
from tests.common import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def disttrain(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "disttrain", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def disttrain_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``disttrain ARGS`` through the same entry point, in this process (its workers are still launched
    processes): saves a Python start and a torch import per call, which the suite pays for every command."""
    capsys.readouterr()
    code = cli_main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["disttrain", *args], code, out.out, out.err)


def test_verify_demo_is_equivalent_and_sum_is_not(tmp_path, capsys, pooled_launches):
    # The first verify launches its ranks for real (a subprocess); the second runs them on the pools.
    ok = disttrain("verify", str(DEMO), "--set", f"train.out_dir={tmp_path / 'a'}")
    assert ok.returncode == 0, ok.stderr
    assert "verdict: EQUIVALENT: 2 processes match one process" in ok.stdout
    rows = [line.split() for line in ok.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 20 and [int(r[0]) for r in rows] == list(range(20))  # one row per step
    assert all(float(r[3]) <= 1e-10 for r in rows)

    bad = disttrain_here(capsys, "verify", str(DEMO), "--json", "--set", f"train.out_dir={tmp_path / 'b'}",
                    "--set", "comm.reduce=sum")
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)  # --json: stdout is only the JSON summary
    assert report["equivalent"] is False and report["world_size"] == 2
    assert report["max_param_rel_diff"] > 1e-2 and report["tolerance"] == 1e-10
    assert len(report["steps"]) == 20


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_nproc_3_equals_nproc_1(tmp_path, capsys):
    common = ["--set", "train.dtype=float64", "--set", "train.global_batch_size=30", "--set", "model.norm=none",
              "--set", "train.log_every=5", "--set", "train.steps=10"]
    three = disttrain("train", str(DEMO), "--nproc", "3", "--set", f"train.out_dir={tmp_path / 'w3'}", *common)
    one = disttrain_here(capsys, "train", str(DEMO), "--nproc", "1", "--set", f"train.out_dir={tmp_path / 'w1'}",
                         *common)
    assert three.returncode == 0, three.stderr
    assert one.returncode == 0, one.stderr
    assert [line.split()[1] for line in three.stdout.splitlines() if line.startswith("step")] == [
        "1/10", "6/10", "10/10"]  # log_every=5, plus the last step

    a, b = _load(tmp_path / "w3" / "final.pt"), _load(tmp_path / "w1" / "final.pt")
    assert set(a) == {"model", "step", "config", "world_size"}
    assert (a["step"], a["world_size"], b["world_size"]) == (10, 3, 1)
    assert a["config"]["train"]["global_batch_size"] == 30
    assert max(relative_difference(a["model"][k], b["model"][k]) for k in b["model"]) <= 1e-10
    metrics = [json.loads(line) for line in (tmp_path / "w3" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10)) and all(m["samples"] == 30 for m in metrics)
    assert "global_batch_size: 30" in (tmp_path / "w3" / "config.yaml").read_text()


def test_torchrun_run_checked_with_verify_against(tmp_path, capsys):
    run_dir = tmp_path / "torchrun"
    trained = subprocess.run(
        [*TORCHRUN, "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
         "-m", "disttrain", "train", str(DEMO), "--set", f"train.out_dir={run_dir}", "--set", "train.steps=8",
         "--set", "train.device=cpu"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr
    checked = disttrain_here(capsys, "verify", str(DEMO), "--against", str(run_dir), "--json",
                        "--set", f"train.out_dir={tmp_path / 'check'}", "--set", "train.steps=8",
                             "--set", "train.device=cpu")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["world_size"] == 2

    other = disttrain_here(capsys, "verify", str(DEMO), "--against", str(run_dir), "--set", "train.steps=8",
                      "--set", "optim.lr=0.2", "--set", f"train.out_dir={tmp_path / 'check'}")
    assert other.returncode == 2
    assert other.stderr.strip().endswith("trained with a different config (optim.lr differ)")
    missing = disttrain_here(capsys, "verify", str(DEMO), "--against", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no final.pt there" in missing.stderr


def test_worker_failure_is_one_line_exit_1(tmp_path):
    """A divergent run with clip.nonfinite=error fails inside the workers; the launcher reports it in one line."""
    args = ["--set", "model.name=mlp", "--set", "model.norm=none", "--set", "optim.lr=1e6",
            "--set", "clip.nonfinite=error", "--set", f"train.out_dir={tmp_path}"]
    launched = disttrain("train", str(DEMO), "--nproc", "2", *args)
    assert launched.returncode == 1
    assert launched.stderr.strip().splitlines()[-1].startswith("disttrain: error: worker failed: rank ")
    assert "NonFiniteGradient: step " in launched.stderr.strip().splitlines()[-1]
    assert "Traceback" not in launched.stderr, launched.stderr  # torch's agent log stays off the console
    alone = disttrain("train", str(DEMO), *args)
    assert alone.returncode == 1
    # device auto's one line that it runs on the CPU comes first; the failure is then one line of its own
    err = [line for line in alone.stderr.strip().splitlines() if "no CUDA device visible" not in line]
    assert len(err) == 1 and err[0].startswith("disttrain: error: step ") and "Traceback" not in alone.stderr


def test_missing_peer_at_startup_is_a_one_line_error(tmp_path):
    """Rank 0 of a 2-rank job whose peer never starts: the rendezvous times out, no hang, one line."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = disttrain("train", str(DEMO), "--set", "comm.timeout_s=2", "--set", f"train.out_dir={tmp_path}",
                       env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "disttrain: error: rank 0: no answer from a peer within comm.timeout_s=2 s "
        "(a peer is dead, stuck, or never started)")


PEER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    from disttrain.parallel.env import PeerFailure, distributed
    try:
        with distributed("cpu", timeout_s=3) as env:
            dist.all_reduce(torch.ones(2))  # both ranks are up
            if env.rank == 1:
                if sys.argv[1] == "die":
                    os._exit(9)
                time.sleep(60)  # stuck: alive but never joins the next collective
            dist.all_reduce(torch.ones(2))
    except PeerFailure as exc:
        print(exc)
        sys.exit(1)
""")


@pytest.mark.parametrize("how, message", [
    ("die", "rank 0: a peer process died (its connection closed)"),
    ("hang", "rank 0: no answer from a peer within comm.timeout_s=3 s"),
])
def test_dead_or_stuck_peer_ends_the_collective(tmp_path, how, message):
    script = tmp_path / "peer.py"
    script.write_text(PEER_SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=45)  # bounded by comm.timeout_s, not by the sleeping peer
        assert procs[0].returncode == 1
        assert message in out
    finally:
        for p in procs:
            p.kill()
            p.wait()


SCHEDULE_CLIP_ACCUM = ["--set", "schedule.warmup=linear", "--set", "schedule.warmup_steps=4", "--set",
                       "schedule.decay=cosine", "--set", "clip.mode=norm", "--set", "clip.max_norm=0.3",
                       "--set", "train.accumulation_steps=2", "--set", "train.steps=12"]


def test_verify_with_warmup_clipping_and_accumulation(tmp_path, capsys, pooled_launches):
    ok = disttrain_here(capsys, "verify", str(DEMO), "--nproc", "3", "--json", "--set", f"train.out_dir={tmp_path / 'a'}",
                   "--set", "model.norm=none", *SCHEDULE_CLIP_ACCUM)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["equivalent"] and report["claimed"] and report["max_param_rel_diff"] <= 1e-10
    metrics = [json.loads(line) for line in (tmp_path / "a" / "distributed" / "metrics.jsonl").read_text().splitlines()]
    assert [round(m["lr"], 12) for m in metrics[:5]] == [0.01, 0.0325, 0.055, 0.0775, 0.1]  # linear warmup
    assert any(m["grad_norm"] > 0.3 for m in metrics)  # clipping was active

    # With batch norm, accumulation changes the statistics: verify says so instead of claiming equivalence.
    bn = disttrain_here(capsys, "verify", str(DEMO), "--nproc", "3", "--set", f"train.out_dir={tmp_path / 'b'}",
                   "--set", "model.norm=bn", *SCHEDULE_CLIP_ACCUM)
    assert bn.returncode == 1, bn.stderr
    assert "note: model.norm=bn with train.accumulation_steps=2: batch-norm statistics are computed per " \
           "micro-batch" in bn.stdout
    assert "verdict: NOT EQUIVALENT" in bn.stdout


def test_large_batch_example_logs_lr_and_grad_norm(tmp_path):
    result = disttrain("train", str(ROOT / "configs" / "large_batch.yaml"), "--nproc", "2",
                       "--set", "train.steps=8", "--set", f"train.out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 8
    fields = [dict(part.strip().split(" ", 1) for part in line.split("|")[1:]) for line in lines]
    lrs = [float(f["lr"]) for f in fields]
    # Linear scaling rule: base lr 0.1 * 512 / 256 = 0.2, warmup from 0.1 * 0.2 over 5 steps, then cosine.
    assert lrs[:6] == pytest.approx([0.02, 0.056, 0.092, 0.128, 0.164, 0.2], rel=1e-5)
    assert lrs[6] < 0.2
    assert all(float(f["grad_norm"]) > 0 for f in fields)


def test_verify_syncbn_cnn_uneven_batch_and_per_rank_bn_contrast(tmp_path, capsys, pooled_launches):
    """The demo CNN with SyncBN, W=3, B=31 (slices 11/10/10), float64: equivalent; per-rank BN: not."""
    common = ["--nproc", "3", "--json", "--set", "train.global_batch_size=31", "--set", "train.steps=10"]
    sync = disttrain_here(capsys, "verify", str(DEMO), *common, "--set", f"train.out_dir={tmp_path / 's'}")
    assert sync.returncode == 0, sync.stderr
    report = json.loads(sync.stdout)
    assert report["equivalent"] and report["max_param_rel_diff"] <= 1e-10 and report["world_size"] == 3
    local = disttrain_here(capsys, "verify", str(DEMO), *common, "--set", "model.norm=bn", "--set", f"train.out_dir={tmp_path / 'b'}")
    assert local.returncode == 1, local.stderr
    assert json.loads(local.stdout)["max_param_rel_diff"] > 1e-3


def test_bench_syncbn_prints_a_table(capsys):
    result = disttrain_here(capsys, "bench", "syncbn", "--iters", "2", "--world-sizes", "2", "--channels", "8")
    assert result.returncode == 0, result.stderr
    assert "two-pass" in result.stdout and "disttrain" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("|")]) >= 3

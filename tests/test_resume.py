"""Checkpoints, resume, elastic restarts and resizing: a run that stops and continues, on the same or another
number of processes, ends where the uninterrupted run ends.

Same world size: bitwise at W=1 and W=2 (a sum of two numbers does not depend on its order), 1e-12 at W=4 (a
fresh process group may order its reduction differently). Another world size: within 1e-10 of one device.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from disttrain.checkpoint.format import CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint, newest_readable, save_checkpoint
from disttrain.checkpoint.files import atomic_save
from disttrain.cli.main import main as cli_main
from disttrain.config import config_from_dict, load_config
from disttrain.parallel.env import distributed
from disttrain.observe.runlog import read_metrics
from disttrain.run.train import run
from disttrain.verify.whole import compare_runs
from tests.common import free_port, max_rel_diff

ROOT = Path(__file__).resolve().parents[1]

# SyncBN CNN, warmup then cosine decay, global-norm clipping (active), accumulation; float64. Slices of 14:
# 7/7 (W=2), 5/5/4 (W=3), 4/4/3/3 (W=4).
BITWISE = ["model.name=cnn", "model.norm=syncbn", "model.hidden=8", "data.num_samples=56",
           "train.global_batch_size=14", "train.steps=12", "train.dtype=float64", "train.device=cpu",
           "train.accumulation_steps=2", "schedule.warmup=linear", "schedule.warmup_steps=3",
           "schedule.decay=cosine", "clip.mode=norm", "clip.max_norm=0.5", "train.checkpoint_every=4",
           "train.keep_checkpoints=0", "optim.lr=0.2"]
# The same without accumulation, so that one device on the global batch is the reference (with SyncBN and
# micro-batches the statistics are per micro-batch, and equivalence with one device is not claimed).
RESIZE = [o for o in BITWISE if not o.startswith("train.accumulation_steps")] + ["train.steps=15",
                                                                                 "train.checkpoint_every=3"]


def _cfg(overrides: list[str], out_dir: Path, *extra: str) -> dict:
    return load_config(None, [*overrides, f"train.out_dir={out_dir}", *extra]).to_dict()


def train_segment(cfg_dict: dict, resume: bool, until: int | None) -> dict[str, torch.Tensor]:
    """Train (or continue) on this rank up to ``until``; the model's state_dict."""
    cfg = config_from_dict(cfg_dict)
    with distributed("cpu", cfg.comm.timeout_s) as env:
        result = run(cfg, env, console=False, resume=resume, stop_at=until)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _segment(pools, world_size: int, cfg: dict, resume: bool, until: int | None) -> dict[str, torch.Tensor]:
    if world_size == 1:
        return train_segment(cfg, resume, until)
    return pools(world_size).run(train_segment, cfg, resume, until)[0]


def _final_checkpoint(out_dir: Path) -> dict:
    step, path = list_checkpoints(out_dir)[-1]
    return load_checkpoint(path)


def _assert_bitwise(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise the same model and optimizer state."""
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # lr included
    assert a["scheduler"] == b["scheduler"] and a["skipped"] == b["skipped"] and a["step"] == b["step"]


def _steps(out_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out_dir)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_resume_continues_the_uninterrupted_run(pools, tmp_path, world_size):
    whole = _cfg(BITWISE, tmp_path / "whole")
    _segment(pools, world_size, whole, False, None)
    parts = _cfg(BITWISE, tmp_path / "parts")
    _segment(pools, world_size, parts, False, 6)  # stops after step 6: checkpoints 4 and 6, no final.pt
    assert [s for s, _ in list_checkpoints(tmp_path / "parts")] == [4, 6]
    assert not (tmp_path / "parts" / "final.pt").exists()
    _segment(pools, world_size, parts, True, None)

    a, b = _final_checkpoint(tmp_path / "whole"), _final_checkpoint(tmp_path / "parts")
    assert a["step"] == b["step"] == 12 and b["world_size"] == world_size
    if world_size <= 2:
        _assert_bitwise(a, b)
    else:
        assert max_rel_diff(b["model"], a["model"]) <= 1e-12
    assert _steps(tmp_path / "parts") == list(range(12))  # one record per step, none twice
    # The run moved: checkpoint 4 is far from the end, so the comparison above is not vacuous.
    assert max_rel_diff(load_checkpoint(checkpoint_path(tmp_path / "parts", 4))["model"], a["model"]) > 1e-3


def test_resized_run_equals_one_device_and_verifies(pools, tmp_path):
    """W=4 for steps 0-2, then 3, 2, 1 and 3 processes: the trajectory does not depend on the world size."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "resized"
    reference = _segment(pools, 1, _cfg(RESIZE, ref_dir), False, None)
    cfg = _cfg(RESIZE, run_dir)
    for i, (world_size, until) in enumerate([(4, 3), (3, 6), (2, 9), (1, 12), (3, None)]):
        state = _segment(pools, world_size, cfg, i > 0, until)
        assert load_checkpoint(list_checkpoints(run_dir)[-1][1])["world_size"] == world_size
    assert max_rel_diff(state, reference) <= 1e-10
    assert _steps(run_dir) == list(range(15))
    report = compare_runs(config_from_dict(cfg), run_dir, ref_dir)  # what `verify --against` does
    assert report.equivalent and report.world_size == 3, report.table()


def test_keep_checkpoints_prunes_oldest_and_fresh_run_clears_old_ones(tmp_path):
    cfg = _cfg(RESIZE, tmp_path, "train.keep_checkpoints=2", "train.steps=8", "train.checkpoint_every=2")
    train_segment(cfg, False, None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
    # A fresh run (no --resume) into the same directory must never resume from the earlier run's files.
    train_segment(_cfg(RESIZE, tmp_path, "train.steps=3", "train.checkpoint_every=2"), False, 1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


# --------------------------------------------------------------------------- atomic writes, unreadable files

def _write_forever(directory: str) -> None:  # a forked child: write checkpoints until killed
    big = {"w": torch.randn(1_000_000, dtype=torch.float64)}  # 8 MB: a kill often lands mid-write
    step = 0
    while True:
        step += 1
        save_checkpoint(directory, {"format": 1, "step": step, "model": big, "optimizer": {}, "scheduler": {},
                                    "skipped": 0, "config": {}, "world_size": 1}, keep=2)


def test_kill_during_checkpoint_write_never_leaves_a_torn_newest(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for attempt in range(6):
        child = ctx.Process(target=_write_forever, args=(str(tmp_path),))
        child.start()
        deadline = time.monotonic() + 60  # a busy machine only makes the first write slower
        while not list_checkpoints(tmp_path) and time.monotonic() < deadline and child.is_alive():
            time.sleep(0.01)
        time.sleep(rng.random() * 0.3)  # then a kill at a random instant, most likely during a later write
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        found = list_checkpoints(tmp_path)
        assert found, "the writer never finished a checkpoint"
        for _, path in found:  # every file under a checkpoint name is complete
            load_checkpoint(path)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert all(name.startswith(".step_") for name in leftovers)  # torn temporaries never match step_*.pt


def test_unreadable_newest_checkpoint_is_skipped_with_one_line(tmp_path):
    state = {"format": 1, "step": 0, "model": {}, "optimizer": {}, "scheduler": {}, "skipped": 0, "config": {},
             "world_size": 1}
    save_checkpoint(tmp_path, {**state, "step": 4}, keep=0)
    good = checkpoint_path(tmp_path, 4).read_bytes()
    checkpoint_path(tmp_path, 8).write_bytes(good[: len(good) // 2])  # truncated
    atomic_save({"not": "a checkpoint"}, checkpoint_path(tmp_path, 12))
    lines: list[str] = []
    assert newest_readable(tmp_path, lines.append)["step"] == 4
    assert len(lines) == 2 and "step_00000012.pt" in lines[0] and "step_00000008.pt" in lines[1]
    assert all("\n" not in line for line in lines)


# --------------------------------------------------------------------------- user errors, in-process CLI

def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_a_refused_run_leaves_no_directory_behind(capsys, tmp_path):
    """--resume with no checkpoint, and a config error found by the checks before training: exit 2, and the
    run directory (with its missing parents) is not created."""
    demo = str(ROOT / "configs" / "demo.yaml")
    out_dir = tmp_path / "new" / "run"
    code, err = _cli(capsys, "train", demo, "--resume", "--set", f"train.out_dir={out_dir}")
    assert code == 2 and "--resume: no readable checkpoint" in err
    code, err = _cli(capsys, "train", demo, "--stop-at", "99", "--set", f"train.out_dir={out_dir}")
    assert code == 2 and "--stop-at" in err
    assert list(tmp_path.iterdir()) == []


def test_resume_errors_are_one_line_exit_2(capsys, tmp_path):
    demo = str(ROOT / "configs" / "demo.yaml")
    out = f"train.out_dir={tmp_path}"
    code, err = _cli(capsys, "train", demo, "--resume", "--set", out)
    assert code == 2 and err == f"disttrain: error: --resume: no readable checkpoint in {tmp_path / 'checkpoints'}"

    checkpoint_path(tmp_path, 3).parent.mkdir(parents=True)
    checkpoint_path(tmp_path, 3).write_bytes(b"\x00not a zip")
    code, err = _cli(capsys, "train", demo, "--resume", "--set", out)
    assert code == 2 and "no readable checkpoint" in err and len(err.splitlines()) == 1

    cfg = _cfg(RESIZE, tmp_path, "train.steps=4", "train.checkpoint_every=2")
    train_segment(cfg, False, 2)
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    code, err = _cli(capsys, "train", str(tmp_path / "run.yaml"), "--resume", "--set", "optim.lr=0.3",
                     "--set", "seed=1")
    assert code == 2 and len(err.splitlines()) == 1
    assert "optim.lr, seed differ" in err and "cannot resume from step 2" in err
    # Keys that do not change the trajectory may differ; train.steps too when the schedule ignores it.
    code, err = _cli(capsys, "train", str(tmp_path / "run.yaml"), "--resume", "--set", "schedule.decay=cosine",
                     "--set", "train.steps=6")
    assert code == 2 and "train.steps differ" in err
    for argv, message in [
        (["--max-restarts", "1"], "--max-restarts needs --nproc N with N >= 2"),
        (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts: must be >= 0"),
        (["--stop-at", "0"], "--stop-at: must be in [1, train.steps=4]"),
        (["--nproc", "2", "--max-restarts", "1", "--set", "train.checkpoint_every=0"], "would start over"),
    ]:
        code, err = _cli(capsys, "train", str(tmp_path / "run.yaml"), *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_stop_at_and_resume_of_a_complete_run_say_so_in_one_line(capsys, tmp_path):
    cfg = _cfg(RESIZE, tmp_path, "train.steps=4", "train.checkpoint_every=3", "train.log_every=100")
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    config = str(tmp_path / "run.yaml")
    assert cli_main(["train", config, "--stop-at", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # The stop step is checkpointed although it is not a multiple of checkpoint_every.
    assert out[-1] == f"stopped at step 2 of 4: checkpoint {checkpoint_path(tmp_path, 2)}; continue with --resume"
    assert cli_main(["train", config, "--resume"]) == 0
    assert "stopped at" not in capsys.readouterr().out
    records = (tmp_path / "metrics.jsonl").read_text()
    assert cli_main(["train", config, "--resume"]) == 0  # nothing left to train: said, not trained
    assert capsys.readouterr().out.strip() == (f"run already complete: {checkpoint_path(tmp_path, 4)} is step 4 of "
                                               "train.steps=4; nothing to train (raise train.steps to continue it)")
    assert (tmp_path / "metrics.jsonl").read_text() == records


def test_non_utf8_config_and_truncated_final_pt_are_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"seed: 0\ntrain: {steps: \xff\xfe}\n")
    code, err = _cli(capsys, "config", str(bad))
    assert code == 2 and err.startswith(f"disttrain: error: {bad}: not a UTF-8 text file") and "\n" not in err

    run_dir = tmp_path / "run"
    cfg = _cfg(RESIZE, run_dir, "train.steps=2", "train.checkpoint_every=0", "schedule.warmup_steps=1")
    train_segment(cfg, False, None)
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    final = run_dir / "final.pt"
    final.write_bytes(final.read_bytes()[:200])
    code, err = _cli(capsys, "verify", str(tmp_path / "run.yaml"), "--against", str(run_dir))
    assert code == 2 and err.splitlines()[-1].startswith(f"disttrain: error: --against: {final}: unreadable")


# --------------------------------------------------------------------------- kill -9, end to end

def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _is_worker(pid: int) -> bool:
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"-m disttrain.parallel.worker" in cmdline or b"-m disttrain train" in cmdline


def _kill_after_checkpoint(proc: subprocess.Popen, out_dir: Path, timeout: float = 90) -> None:
    """SIGKILL one worker process of ``proc`` (``proc`` itself if it has none) once a checkpoint exists."""
    deadline = time.monotonic() + timeout
    while not list_checkpoints(out_dir):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    workers = [p for p in _descendants(proc.pid) if _is_worker(p)]
    os.kill(workers[-1] if workers else proc.pid, signal.SIGKILL)


# Long enough that the kill lands mid-run however fast the machine (a few ms per step here).
LONG = ["train.steps=200", "train.checkpoint_every=5", "train.log_every=1000", "model.hidden=8",
        "train.dtype=float64", "train.device=cpu", "schedule.warmup=linear", "schedule.decay=cosine",
        "clip.mode=norm", "clip.max_norm=0.5"]


def _disttrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "disttrain", *args]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_kill_9_then_max_restarts_and_resume_are_bitwise(pools, tmp_path):
    demo = str(ROOT / "configs" / "demo.yaml")
    # W=2: the elastic agent restarts the group, which continues from the newest checkpoint by itself.
    restarted = tmp_path / "restarted"
    proc = subprocess.Popen(_disttrain("train", demo, "--nproc", "2", "--max-restarts", "1",
                                       *_sets([*LONG, f"train.out_dir={restarted}"])),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_after_checkpoint(proc, restarted)
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err
    assert "resuming from step" in out  # it really was interrupted and restarted
    # One line for the failed worker instead of torch's log records and their traceback.
    assert re.fullmatch(r"disttrain: rank [01] was killed by signal SIGKILL; restarting the worker group "
                        r"\(restart 1 of 1\)", err.strip()), err
    # W=1: killed, then `disttrain train --resume`.
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_disttrain("train", demo, *_sets([*LONG, f"train.out_dir={resumed}"])), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_after_checkpoint(proc, resumed)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(_disttrain("train", demo, "--resume", *_sets([*LONG, f"train.out_dir={resumed}"])),
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0 and "resuming from step" in done.stdout, done.stderr

    for world_size, run_dir in ((2, restarted), (1, resumed)):
        whole = tmp_path / f"whole{world_size}"
        _segment(pools, world_size, load_config(demo, [*LONG, f"train.out_dir={whole}"]).to_dict(), False, None)
        _assert_bitwise(_final_checkpoint(whole), _final_checkpoint(run_dir))
        assert _steps(run_dir) == list(range(200))


@pytest.mark.slow
def test_torchrun_elastic_membership_survivor_finishes_alone(tmp_path):
    """Two torchrun agents (--nnodes=1:2, one worker each) on loopback; the second agent and its worker are
    killed after the first checkpoint. The survivor's worker fails on the closed connection, its agent
    restarts it in a new rendezvous round of one node, and it finishes from the checkpoint as W=1."""
    demo = str(ROOT / "configs" / "demo.yaml")
    # Long enough that the kill lands mid-run (the survivor then waits for the lost node at the end).
    overrides = ["train.steps=300", "train.checkpoint_every=5", "train.log_every=1000", "model.hidden=8",
                 f"train.out_dir={tmp_path / 'run'}"]
    port = free_port()

    def agent(is_host: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1",
                "--max-restarts=3", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=elastic",
                f"--rdzv_conf=is_host={is_host},join_timeout=60,last_call_timeout=3,close_timeout=5,"
                "keep_alive_interval=1,keep_alive_max_attempt=2",
                "-m", "disttrain", "train", demo, *_sets(overrides)]
    # A fresh store per rendezvous round: torch's shared store does not survive a change of membership.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    logs = {name: (tmp_path / f"{name}.out").open("w+") for name in ("host", "other")}
    # The node to be lost must not host the rendezvous store: is_host says which one does.
    other = subprocess.Popen(agent(0), cwd=ROOT, env=env, stdout=logs["other"], stderr=subprocess.STDOUT, text=True)
    host = subprocess.Popen(agent(1), cwd=ROOT, env=env, stdout=logs["host"], stderr=subprocess.STDOUT, text=True)

    def log(name: str) -> str:
        logs[name].seek(0)
        return logs[name].read()[-4000:]

    def newest_world_size() -> int:
        found = list_checkpoints(tmp_path / "run")
        try:
            return load_checkpoint(found[-1][1])["world_size"] if found else 0
        except (OSError, CheckpointError):  # pruned between listing and reading
            return 0
    try:
        deadline = time.monotonic() + 120
        while newest_world_size() != 2:  # both nodes train together
            assert host.poll() is None and other.poll() is None, log("host") + log("other")
            assert time.monotonic() < deadline, "no checkpoint of two processes appeared"
            time.sleep(0.02)
        for pid in [other.pid, *_descendants(other.pid)]:  # the agent and its worker (own session): a node lost
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            host.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving agent did not finish:\n" + log("host"))
    finally:
        for proc in (host, other):
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    out = log("host")
    assert host.returncode == 0, out
    assert "resuming from step" in out and "now 1)" in out
    final = _final_checkpoint(tmp_path / "run")
    assert final["step"] == 300 and final["world_size"] == 1
    assert _steps(tmp_path / "run") == list(range(300))
    reference = train_segment(load_config(demo, [*overrides, f"train.out_dir={tmp_path / 'ref'}",
                                                 "train.device=cpu"]).to_dict(), False, None)
    assert max_rel_diff(final["model"], reference) <= 1e-10


def _decide_with_restart_count(cfg_dict: dict, count_on_rank_1: str) -> object:
    import os

    from disttrain.checkpoint.resume import resume_state

    cfg = config_from_dict(cfg_dict)
    with distributed("cpu", 20.0) as env:
        os.environ["TORCHELASTIC_RESTART_COUNT"] = count_on_rank_1 if env.rank == 1 else "0"
        try:
            state = resume_state(cfg, env, resume=False)
        finally:
            del os.environ["TORCHELASTIC_RESTART_COUNT"]
    return None if state is None else state["step"]


def test_ranks_with_different_restart_counts_take_rank_0s_decision(pools, tmp_path):
    """A node that joins a restarted group sees restart count 0 where the others see 1: rank 0 decides for all,
    and no rank waits in a broadcast the others skipped."""
    cfg = load_config(None, ["train.device=cpu", f"train.out_dir={tmp_path}"])
    assert pools(2).run(_decide_with_restart_count, cfg.to_dict(), "1") == [None, None]

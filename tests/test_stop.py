"""Stopping on a signal at a step every rank agrees on, and storage failures: one line, the right exit code,
the newest complete checkpoint intact, and a resume equal to the uninterrupted run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from disttrain.cli.main import main
from disttrain.config import config_from_dict, load_config
from disttrain.parallel.env import distributed
from disttrain.run.stop import GracefulStop
from disttrain.run.tasks import train_or_stop
from disttrain.run.train import Hook, run

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
LINE = re.compile(r"^stopped by (SIG\w+) at step (\d+): checkpoint (\S+); continue with --resume$", re.M)


def _cfg(out_dir: Path, *extra: str):
    return load_config(DEMO, ["train.device=cpu", f"train.out_dir={out_dir}", "train.log_every=1000",
                              "train.checkpoint_every=0", *extra])


def _states_equal(a: Path, b: Path) -> bool:
    sa = torch.load(a / "final.pt", weights_only=True)["model"]
    sb = torch.load(b / "final.pt", weights_only=True)["model"]
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- a signal to some ranks only

class SignalOneRank(Hook):
    """Rank ``rank`` sends itself ``signum`` at the end of step ``step`` (a scheduler signalling one node)."""

    def __init__(self, rank: int, step: int, signum: int):
        self.rank, self.step, self.signum = rank, step, signum

    def on_step_end(self, trainer, step, result) -> None:
        if trainer.env.rank == self.rank and step == self.step:
            os.kill(os.getpid(), self.signum)


def stop_one_rank(cfg_dict: dict, rank: int, step: int) -> dict:
    cfg = config_from_dict(cfg_dict)
    stop = GracefulStop()
    with distributed("cpu", cfg.comm.timeout_s) as env:
        result = run(cfg, env, console=False, hooks=[SignalOneRank(rank, step, signal.SIGUSR1), stop])
    return {"signum": stop.signum, "stopped_at": result.stopped_at, "handler": signal.getsignal(signal.SIGUSR1)}


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(pools, tmp_path):
    """SIGUSR1 on rank 2 after step 4 (checkpoint_every=0): all three ranks stop after the same step, agreed
    through the gradient reduction, and rank 0 writes a checkpoint there; the handlers are restored."""
    cfg = _cfg(tmp_path, "train.steps=40", "train.global_batch_size=31")
    out = pools(3).run(stop_one_rank, cfg.to_dict(), 2, 4)
    assert {o["signum"] for o in out} == {signal.SIGUSR1}
    (stopped_at,) = {o["stopped_at"] for o in out}
    assert stopped_at in (5, 6)  # the step the signal came in (when before its reduction), else the next one
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:08d}.pt").is_file()
    assert all(o["handler"] == signal.SIG_DFL for o in out)


def test_second_signal_exits_at_once():
    """A different signal after the first (or the same one after the repeat window) is not queued: the
    process ends with that signal's own default action."""
    code = ("import signal; from disttrain.run.stop import GracefulStop; s = GracefulStop()\n"
            "s._handle(signal.SIGTERM, None); s._handle(signal.SIGTERM, None)  # a forwarded copy: ignored\n"
            "s._handle(signal.SIGINT, None); print('not reached')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == -signal.SIGINT and "not reached" not in result.stdout


def test_the_first_signal_to_the_launcher_decides_the_exit_code(monkeypatch):
    """SIGTERM, then Ctrl-C while torch's agent shuts the workers down (they stop for SIGTERM and say so): the
    launcher returns SIGTERM, not the SIGINT it raised last."""
    import disttrain.run.nproc as tasks
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def agent(*args, **kwargs):
        try:
            raise SignalException("got SIGTERM", sigval=signal.SIGTERM)
        except SignalException:  # the agent's shutdown, interrupted
            raise SignalException("got SIGINT", sigval=signal.SIGINT)

    monkeypatch.setattr(tasks, "launch_local_tasks", agent)
    assert tasks.launch_training(_cfg(Path("unused")), 2) == signal.SIGTERM


def _loader_worker(ready) -> None:  # a forked stand-in for a DataLoader worker
    from disttrain.data.loader import LoaderWorkerInit

    LoaderWorkerInit(lambda worker_id: ready.set())(0)  # the user's own worker_init_fn runs after it
    while True:
        time.sleep(0.05)


def test_loader_workers_leave_the_stop_signals_to_their_rank():
    """A loader worker ignores SIGINT, SIGUSR1 and a SIGTERM from anyone but its rank (a scheduler's signal to every
    process); its rank's SIGTERM (DataLoader's shutdown, multiprocessing's exit) still ends it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_loader_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(60)
        for name in ("INT", "USR1", "TERM"):  # from another process, as Slurm or `kill -TERM -PGID` send them
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
        worker.join(1.0)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from its parent
        worker.join(30)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


# --------------------------------------------------------------------------- a signal to the launcher

def _start(args: list[str], out_dir: Path, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", *launcher, "disttrain", "train", str(DEMO), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "metrics.jsonl").is_file() or not (out_dir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc


def _tree(pid: int) -> list[int]:
    """``pid`` and every process under it (the launcher, its ranks, their loader workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for child in children for p in _tree(int(child))]


def _signal_every_process(pid: int, signum: int) -> None:
    """What Slurm does at a time limit or on scancel: the signal to every process of the job step."""
    for p in _tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signum)


def _stopped_line(out: str, out_dir: Path, signame: str) -> int:
    (match,) = LINE.finditer(out)
    name, step, path = match.group(1), int(match.group(2)), Path(match.group(3))
    assert name == signame and path == out_dir / "checkpoints" / f"step_{step:08d}.pt" and path.is_file()
    return step


def _resumed_equals_whole(pools, stopped: Path, step: int, tmp_path: Path) -> None:
    total = step + 6
    cfg = _cfg(stopped, f"train.steps={total}", "train.checkpoint_every=1000")  # (a pool rank forks no workers)
    pools(2).run(_resume, cfg.to_dict())
    whole = _cfg(tmp_path / "whole", f"train.steps={total}")
    pools(2).run(_resume, whole.to_dict(), False)
    assert _states_equal(stopped, tmp_path / "whole")


LONG_RUN = ["--set", "train.steps=3000", "--set", "train.checkpoint_every=1000", "--set", "train.log_every=1000",
            "--set", "train.device=cpu", "--set", "data.workers=1"]


@pytest.mark.timeout(240)
def test_sigterm_to_every_process_checkpoints_and_resume_is_bitwise(pools, tmp_path):
    """SIGTERM to every process of `disttrain train --nproc 2` with a loader worker per rank (Slurm's time limit):
    the workers leave the decision to their ranks, which stop at one step; one line naming the step and its
    checkpoint, exit 143, nothing else on stderr, and the resumed run (W=2, bitwise) equals the uninterrupted one."""
    stopped = tmp_path / "stopped"
    proc = _start(["--nproc", "2", "--set", f"train.out_dir={stopped}", *LONG_RUN], stopped)
    _signal_every_process(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = _stopped_line(out, stopped, "SIGTERM")
    assert err == "", err  # no worker's traceback; the agent's records went to launcher.log
    # The workers left by themselves once stopped; the agent did not have to wait out its timeout and kill them.
    assert "forcefully exiting" not in (stopped / "launcher.log").read_text()
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(step))  # every step up to the stop is logged, none after
    _resumed_equals_whole(pools, stopped, step, tmp_path)


@pytest.mark.timeout(240)
def test_sigusr1_to_torchruns_group_with_loader_workers_checkpoints_and_resume_is_bitwise(pools, tmp_path):
    """SIGUSR1 to torchrun's process group (torchrun forwards it to each worker's process group, loader workers
    included): the ranks stop at one step with a checkpoint, rank 0 says where, no resource tracker or worker
    tracebacks; the resumed run equals the uninterrupted one bitwise."""
    stopped = tmp_path / "stopped"
    torchrun = ("torch.distributed.run", "--nproc_per_node", "2", "--signals_to_handle",
                "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m")
    proc = _start(["--set", f"train.out_dir={stopped}", *LONG_RUN], stopped, torchrun)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    step = _stopped_line(out, stopped, "SIGUSR1")
    assert "KeyError" not in err and "resource_tracker" not in err and "pt_data_worker" not in err, err
    _resumed_equals_whole(pools, stopped, step, tmp_path)


@pytest.mark.timeout(180)
def test_a_signal_while_the_workers_start_is_one_line_and_its_exit_code(tmp_path):
    """SIGTERM to the launcher while its workers build the data (before any step): one line, exit 143."""
    out_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "disttrain", "train", str(DEMO), "--nproc", "2",
                             "--set", f"train.out_dir={out_dir}", "--set", "train.device=cpu",
                             "--set", "data.name=tests.factories:signals_the_launcher"],
                            capture_output=True, text=True, cwd=ROOT, timeout=150, start_new_session=True)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip() == ("disttrain: stopped by SIGTERM during start-up, before the first step: "
                                     "no checkpoint written"), result.stderr
    assert not list(out_dir.glob("checkpoints/*.pt"))


def _resume(cfg_dict: dict, resume: bool = True) -> None:
    cfg = config_from_dict(cfg_dict)
    with distributed("cpu", cfg.comm.timeout_s) as env:
        run(cfg, env, console=False, resume=resume)


@pytest.mark.timeout(180)
def test_ctrl_c_to_the_process_group_stops_once_with_exit_130(tmp_path):
    """Ctrl-C reaches the launcher's process group (the workers, each in a session of its own as under torchrun, get
    it from the launcher), with a loader worker per rank: one graceful stop."""
    out_dir = tmp_path / "run"
    proc = _start(["--nproc", "2", "--set", f"train.out_dir={out_dir}", *LONG_RUN], out_dir)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    (match,) = LINE.finditer(out)
    assert match.group(1) == "SIGINT" and Path(match.group(3)).is_file()


def test_single_process_stop_returns_the_signal(tmp_path, capsys):
    """Without a launcher: the run itself gets the signal; the same line, and 128 + the signal number."""
    class Signal(Hook):
        def on_step_end(self, trainer, step, result):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = _cfg(tmp_path, "train.steps=50")
    with distributed("cpu") as env:
        import disttrain.run.tasks as stop_module

        original = stop_module.run
        stop_module.run = lambda *a, hooks, **k: original(*a, hooks=[Signal(), *hooks], **k)
        try:
            assert train_or_stop(cfg, env) == signal.SIGTERM
        finally:
            stop_module.run = original
    (match,) = LINE.finditer(capsys.readouterr().out)
    assert match.group(2) == "4" and Path(match.group(3)).is_file()  # signalled after step 2 was reduced


# --------------------------------------------------------------------------- storage failures

def _storage_error(capsys, tmp_path, out_dir: Path, *extra: str) -> str:
    argv = ["train", str(DEMO), "--set", "train.device=cpu", "--set", f"train.out_dir={out_dir}",
            "--set", "train.log_every=1000", *[a for o in extra for a in ("--set", o)]]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _newest_loads(err: str) -> None:
    newest = Path(re.search(r"newest complete checkpoint: (\S+)$", err).group(1))
    assert torch.load(newest, weights_only=True)["step"] > 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 600 KiB filesystem (tmpfs; needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_line_naming_the_file_and_the_newest_checkpoint(capsys, tmp_path, small_disk):
    err = _storage_error(capsys, tmp_path, small_disk / "run", "train.checkpoint_every=2", "train.keep_checkpoints=0",
                         "train.steps=60")
    assert re.search(r"cannot write \S+/checkpoints/step_\d{8}\.pt: No space left on device \(errno 28\)", err), err
    _newest_loads(err)


class AfterStep(Hook):
    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_end(self, trainer, step, result) -> None:
        if step == self.step:
            self.action()


def _with_hook(monkeypatch, hook: Hook) -> None:
    import disttrain.run.tasks as stop_module

    original = stop_module.run
    monkeypatch.setattr(stop_module, "run", lambda *a, hooks, **k: original(*a, hooks=[hook, *hooks], **k))


def test_read_only_run_directory(capsys, tmp_path, small_disk, monkeypatch):
    remount = ["mount", "-o", "remount,ro", str(small_disk)]
    _with_hook(monkeypatch, AfterStep(4, lambda: subprocess.run(remount, check=True)))
    err = _storage_error(capsys, tmp_path, small_disk / "run", "train.checkpoint_every=2", "train.steps=20")
    assert re.search(r"cannot write \S+: Read-only file system \(errno 30\)", err), err
    _newest_loads(err)


def test_vanished_run_directory(capsys, tmp_path, monkeypatch):
    import shutil

    out_dir = tmp_path / "run"

    def remove() -> None:
        # The background checkpoint writer may be creating a file in checkpoints/ while the tree goes: as a user's
        # `rm -rf` would, try again until the directory is gone (the writer then fails to write, which is the point).
        for attempt in range(50):
            try:
                shutil.rmtree(out_dir)
                return
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY or attempt == 49:
                    raise

    _with_hook(monkeypatch, AfterStep(4, remove))
    err = _storage_error(capsys, tmp_path, out_dir, "train.checkpoint_every=2", "train.steps=20")
    assert re.search(r"cannot write \S+: No such file or directory \(errno 2\); no checkpoint was written", err), err
    assert not out_dir.exists()  # never recreated behind the user's back


def test_tensorboard_curves_continue_without_duplicates_after_a_resume(tmp_path):
    """Stopped at step 8 with checkpoints at 5 and 8; the one at 8 lost: the resumed run restarts at 5 and the
    event files still hold each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "train.steps=10", "train.checkpoint_every=5", "train.keep_checkpoints=0")
    with distributed("cpu") as env:
        run(cfg, env, console=False, stop_at=8)
        (tmp_path / "checkpoints" / "step_00000008.pt").unlink()
        assert run(cfg, env, console=False, resume=True).start_step == 5
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in ("loss", "lr", "grad_norm", "step_ms",
                                                                   "samples_per_s")}
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == list(range(10)), steps
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)] == pytest.approx(
        [m["loss"] for m in metrics])


def test_a_fresh_run_into_the_same_out_dir_starts_with_empty_tensorboard_curves(tmp_path):
    """A second fresh (not resumed) run into the same out_dir: its steps once each, none of the first run's; files
    of the user's own in the directory stay."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with distributed("cpu") as env:
        run(_cfg(tmp_path, "train.steps=6"), env, console=False)
        (tmp_path / "tensorboard" / "notes.txt").write_text("mine")
        run(_cfg(tmp_path, "train.steps=4"), env, console=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("train/loss")) == [0, 1, 2, 3]
    assert (tmp_path / "tensorboard" / "notes.txt").read_text() == "mine"

"""Starting the checked script: W ranks with the environment torchrun gives its workers, and one process.

Each rank is ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) with RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a free loopback port), and the rest of what torchrun's agent sets
(GROUP_RANK, ROLE_*, TORCHELASTIC_*: Lightning recognises torchrun by them), OMP_NUM_THREADS=1 when several share
the cores (torchrun does the same). There is no agent: the check watches the processes itself, so only the script's
processes load the hook, and a rank's own failure is told from its peers' (which fail after it). The one-process
reference gets the same environment with WORLD_SIZE=1: a script that always calls ``init_process_group`` runs, and
so does one that asks whether it was launched. Every process starts in a session of its own (the kernel then shares
the cores between the ranks fairly: DESIGN.md section 5) and is ended with everything it started (its data loader's
workers) when the check is done.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .hook import ENV_DIR, ENV_PERMUTE, ENV_PROCS, ENV_STEPS

SITECUSTOMIZE = '''\
# Written by disttrain check: installs its recording hook, then runs the sitecustomize this one shadows.
import importlib.machinery, importlib.util, os, sys
_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, {root!r})
try:
    from disttrain.check.hook import install
    install()
finally:
    sys.path.remove({root!r})
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''


class ScriptError(ConfigError):
    """The checked script failed, hung, or stepped differently than asked: one line, exit 2."""


@dataclass
class Run:
    """One launch of the script: W ranks (the run) or one process (the reference, a twin)."""

    role: str  # "run", "reference", "twin 1", "twin 2"
    command: list[str]
    nproc: int
    out: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    started: float = 0.0
    ended: list[float | None] = field(default_factory=list)

    def label(self, rank: int) -> str:
        return f"rank {rank}" if self.role == "run" else f"the {self.role}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_command(target: list[str]) -> list[str]:
    """``SCRIPT.py ARGS`` or ``-m MODULE ARGS`` as the interpreter's command line."""
    if not target:
        raise ConfigError("check: give the script after --: disttrain check --nproc 2 -- SCRIPT.py [ARGS...]")
    if target[0] == "-m":
        if len(target) < 2:
            raise ConfigError("check: -m needs a module name")
        return [sys.executable, *target]
    if not Path(target[0]).is_file():
        raise ConfigError(f"check: no such script: {target[0]}")
    return [sys.executable, *target]


def start(role: str, command: list[str], nproc: int, steps: int, out: Path, permute: int | None = None) -> Run:
    """Start ``nproc`` processes of ``command`` recording ``steps`` optimizer steps into ``out``/rank*/."""
    site = out / "site"
    site.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(root=root))
    run = Run(role, command, nproc, out, started=time.monotonic())
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(site)] + ([base["PYTHONPATH"]] if base.get("PYTHONPATH") else []))
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        base["OMP_NUM_THREADS"] = "1"
    base.update({"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
                 "ROLE_WORLD_SIZE": str(nproc), "TORCHELASTIC_RUN_ID": f"check-{run_id}",
                 "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "PYTHONUNBUFFERED": "1",
                 ENV_DIR: str(out), ENV_STEPS: str(steps), ENV_PROCS: str(nproc)})
    if permute is not None:
        base[ENV_PERMUTE] = str(permute)
    for rank in range(nproc):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
        log = out / f"rank{rank}.log"
        with open(log, "wb") as handle:
            run.procs.append(subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True,
                                              preexec_fn=_die_with_parent))
        run.logs.append(log)
        run.ended.append(None)
    return run


def steps_recorded(run: Run, rank: int) -> int:
    """Steps of optimizer 0 this rank has recorded so far."""
    try:
        names = os.listdir(run.out / f"rank{rank}")
    except OSError:
        return 0
    return sum(1 for n in names if n.startswith("o0_s") and n != "o0_s0.pt")


def last_line(path: Path) -> str:
    """The last line of a process's output that says something (a traceback's last line: the exception)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line if len(line) <= 200 else line[:197] + "..."


FAILURE_GRACE_S = 5.0  # how long a failed process's peers get to end on their own


def watch(runs: list[Run], timeout_s: float, script: str) -> None:
    """Wait until every process of ``runs`` has ended. A process that fails ends everything: its run's peers once
    each has ended or waits in the hook's barrier, at most a few seconds later (a rank that raised leaves the others
    inside a collective, and a peer that ended its loop early is told from one that failed by when it ended), the
    other runs (the reference, a twin: nothing of theirs is judged once a run failed) with them; no new step in
    ``timeout_s`` ends everything. Raises :class:`ScriptError` naming the first process that failed, or the stall."""
    last_progress, progress = time.monotonic(), -1
    failed: tuple[float, Run, int, int] | None = None
    while True:
        now = time.monotonic()
        alive = 0
        for run in runs:
            for rank, proc in enumerate(run.procs):
                code = proc.poll()
                if code is None:
                    alive += 1
                    continue
                if run.ended[rank] is None:
                    run.ended[rank] = now
                    if code != 0 and failed is None:
                        failed = (now, run, rank, code)
        if failed is not None and (_settled(failed[1]) or now - failed[0] > FAILURE_GRACE_S):
            stop(runs)
            _, run, rank, code = failed
            line = last_line(run.logs[rank]) or f"exit code {code}"
            early = [r for r, p in enumerate(run.procs) if p.returncode == 0 and run.ended[r] is not None
                     and run.ended[r] <= failed[0] and not (run.out / f"rank{r}" / "done").exists()]
            if early:  # a peer that ended its loop leaves the others alone in their next collective
                r = early[0]
                raise ScriptError(f"{script} steps a different number of times on different ranks: rank {r} ended "
                                  f"after {steps_recorded(run, r)} optimizer steps, rank {rank} went on and failed "
                                  f"after {steps_recorded(run, rank)}: {line} (output: {run.logs[rank]})")
            raise ScriptError(f"{script} failed on {run.label(rank)}: {line} (output: {run.logs[rank]})")
        if alive == 0:
            return
        total = sum(steps_recorded(run, r) for run in runs for r in range(run.nproc))
        if total != progress:
            progress, last_progress = total, now
        elif now - last_progress > timeout_s:
            stop(runs)
            where = ", ".join(f"{run.label(r)} at step {steps_recorded(run, r)}" for run in runs
                              for r in range(run.nproc))
            raise ScriptError(f"{script}: no optimizer step within {timeout_s:g} s ({where}); --timeout S allows "
                              "longer")
        time.sleep(0.05)


def _settled(run: Run) -> bool:
    """Every process of ``run`` has ended, or recorded its steps and waits for its peers (the hook's file barrier),
    which a failed peer never joins: nothing left to tell the first failure from."""
    return all(ended is not None or (run.out / f"rank{rank}" / "done").exists() for rank, ended in enumerate(run.ended))


def stop(runs: list[Run]) -> None:
    """End every process of ``runs`` and what it started (its session): SIGTERM, then SIGKILL after 3 s."""
    groups = [proc.pid for run in runs for proc in run.procs]
    for pid in groups:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    for run in runs:
        for proc in run.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for pid in groups:
        _signal_group(pid, signal.SIGKILL)
    for run in runs:
        for proc in run.procs:
            proc.wait()


def _die_with_parent() -> None:
    """In the child before it runs the script: SIGKILL when the check's process dies (a check killed by a timeout
    leaves no rank behind: the ranks are in sessions of their own, out of reach of a signal to the check's group)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["Run", "ScriptError", "start", "watch", "stop", "script_command", "steps_recorded", "last_line",
           "free_port"]

"""One local rank started by the ``--nproc`` launcher (launch.py): ``python -m disttrain.parallel.worker DIR``.

torch's elastic agent starts it as torchrun starts a worker: a fresh interpreter in a session of its own (so a
busy machine's scheduler, which shares the CPU between sessions first, gives each rank a session's share, as it
does torchrun's), with RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous in its environment. The launcher left the
tasks in ``DIR/tasks.pkl``; the rank runs them in one process group and writes what they returned to
``DIR/result_RANK.pkl``. A user error (:class:`~disttrain.errors.ConfigError`) and a stop signal before the run
began its steps (:class:`~disttrain.errors.StoppedWhileStarting`) go to ``DIR/error_RANK.pkl`` as they are, so the launcher can report it as the one-line user error it is; every exception is also recorded in torch's
error file (the agent reads it back as the failure's message and traceback), and none is printed here.

Signals: the agent forwards the stop signals to the rank's process group (the rank and its loader workers; the
workers leave them to the rank, data/loader.py). A rank is not in its launcher's process group, so a signal to
that group no longer reaches it directly: should the launcher die without forwarding (SIGKILL), the kernel ends
the rank too (``PR_SET_PDEATHSIG``), as it ended every process of the group before.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
from pathlib import Path

TASKS, RESULT, ERROR = "tasks.pkl", "result_{rank}.pkl", "error_{rank}.pkl"
PARENT_ENV = "DISTTRAIN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def _die_with_launcher() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get(PARENT_ENV, str(os.getppid())):
        os._exit(1)  # the launcher died before the request was in place


def main(exchange: str) -> None:
    from ..errors import StartupSignals, StoppedWhileStarting

    _die_with_launcher()
    with StartupSignals():  # from the first instant: a stop signal while importing torch is still one line
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        errors = get_error_handler()
        errors.initialize()
        try:
            _run(Path(exchange))
        except StoppedWhileStarting as exc:
            _write(Path(exchange) / ERROR.format(rank=os.environ.get("RANK", "0")), exc)
            sys.exit(128 + exc.signum)
        except Exception as exc:  # noqa: BLE001 -- recorded for the agent, which reports it; not printed here
            errors.record_exception(exc)
            sys.stdout.flush()
            sys.exit(1)


def _run(exchange: Path) -> None:
    handoff = pickle.loads((exchange / TASKS).read_bytes())
    # The launcher's import path, before the tasks are unpickled: their functions may live in modules it could
    # import (tests, a user's package) that this interpreter's default path does not hold.
    sys.path[:] = handoff["sys_path"] + [p for p in sys.path if p not in handoff["sys_path"]]
    tasks = pickle.loads(handoff["tasks"])
    rank = os.environ["RANK"]
    from ..errors import ConfigError

    try:
        results = run_tasks(tasks, handoff["device"], handoff["timeout_s"])
    except ConfigError as exc:
        _write(exchange / ERROR.format(rank=rank), exc)
        raise
    _write(exchange / RESULT.format(rank=rank), results)


def run_tasks(tasks: list, device: str, timeout_s: float) -> list:
    """The elastic agent has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*: one process group for all tasks
    ``fn(env, *args)``, in order (the process starts, imports torch, once)."""
    from .env import distributed

    with distributed(device, timeout_s) as env:
        return [fn(env, *args) for fn, args in tasks]


def _write(path: Path, value: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(value))
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1])

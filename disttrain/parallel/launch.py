"""Starting local ranks: N workers through torch's elastic launcher, the one way disttrain starts them
(``--nproc``, verify, the demos and the benchmarks).

This is the same agent torchrun runs (torch.distributed.launcher.api), with a c10d rendezvous on a free
loopback port (port 0: the store picks it) and workers started as torchrun starts them (worker.py: fresh
interpreters, each in a session of its own), each with one intra-op thread (see one_thread_per_worker). Several tasks can share one launched group, which pays the worker start-up
(import torch) once. With ``max_restarts`` R > 0 the agent restarts the whole worker group when a worker dies
(kill -9, OOM, an exception), up to R times; the restarted workers see TORCHELASTIC_RESTART_COUNT > 0 and
continue from the newest checkpoint (run/train.py).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .agentlog import restart_lines
from .worker import ERROR, PARENT_ENV, RESULT, TASKS
from ..errors import RunFailure


class WorkerFailure(RunFailure):
    """A worker process failed; the message names the rank and its exception in one line."""


Task = tuple[Callable[..., Any], tuple]  # (fn, args): fn(env, *args) runs on every rank (worker.run_tasks)


class Named:
    """A task's function named by its import path (``package.module:function``) and imported in the workers, so
    the launcher need not import what only the workers run."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, *args: Any) -> Any:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)(*args)


def one_thread(env: Any) -> None:
    """A task: one intra-op thread in this worker, also when it is the only one (benchmarks, the demos)."""
    import torch

    torch.set_num_threads(1)


def launch_local_tasks(tasks: list[Task], nproc: int, device: str = "auto", timeout_s: float = 300.0,
                       max_restarts: int = 0, log_dir: str | Path | None = None) -> list[list[Any]]:
    """Run each task ``fn(env, *args)`` on ``nproc`` local workers, one after another in the same process
    group; return every rank's results (``[rank][task]``). ``fn`` and its arguments must pickle (by reference:
    ``fn`` importable from this process's import path). ``max_restarts``: elastic restarts of the worker group
    after a failure (the tasks then run again from the first). This is the one way disttrain starts local ranks:
    ``--nproc``, verify, the demos and the benchmarks.

    The workers are started as torchrun starts them: fresh interpreters (worker.py), each in a session of its own,
    signalled by the agent (it forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to each worker's process group)
    and killed, process group and all, when the launch fails. torch's elastic agent logs every restart, signal and
    failure with full tracebacks; those records go to ``log_dir/launcher.log`` (nowhere without a ``log_dir``). A
    user error in a worker (:class:`~disttrain.errors.ConfigError`: the checks of the config's model and data, which
    run in the workers) is raised here as it is; any other failure as :class:`WorkerFailure`: one line naming the
    first rank that failed (its exception, message and where it was raised) and that file."""
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"disttrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts,
                          monitor_interval=0.1, signals_to_handle=AGENT_SIGNALS)
    log = Path(log_dir) / LAUNCHER_LOG if log_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as tmp:
        exchange = Path(tmp)
        handoff = {"sys_path": list(sys.path), "tasks": pickle.dumps(tasks), "device": device, "timeout_s": timeout_s}
        (exchange / TASKS).write_bytes(pickle.dumps(handoff))
        try:
            # torch's records go to launcher.log; a failure the agent answers with a restart also gets a console line
            with one_thread_per_worker(nproc), worker_environment(), agent_log(log), restart_lines(), \
                    agent_signal_handlers(), unnamed_rendezvous_events():
                elastic_launch(launch, sys.executable)("-m", "disttrain.parallel.worker", str(exchange))
        except ChildFailedError as exc:
            user_error = _user_error(exchange, nproc)
            if user_error is not None:
                raise user_error from None
            _log_tracebacks(exc, log)
            raise WorkerFailure(_describe(exc, log)) from None
        except SignalException as exc:  # the agent got a signal, forwarded it and waited for the workers
            exc.results = _results(exchange, nproc)  # what the workers that stopped at a step returned
            raise
        results = _results(exchange, nproc)
        return [results[rank] for rank in range(nproc)]


def _log_tracebacks(exc: ChildFailedError, log: Path | None) -> None:
    """Each failed rank's traceback (from its error file) into ``log``, beside the agent's records."""
    if log is None:
        return
    with contextlib.suppress(OSError), log.open("a") as out:
        for rank, failure in sorted(exc.failures.items()):
            message = failure.message if isinstance(failure.message, dict) else {}
            stack = str(message.get("extraInfo", {}).get("py_callstack", "")) or "(no traceback recorded)"
            out.write(f"rank {rank} failed (exit code {failure.exitcode}):\n{stack.rstrip()}\n")


def _results(exchange: Path, nproc: int) -> dict[int, list[Any]]:
    paths = {rank: exchange / RESULT.format(rank=rank) for rank in range(nproc)}
    return {rank: pickle.loads(path.read_bytes()) for rank, path in paths.items() if path.is_file()}


def _user_error(exchange: Path, nproc: int) -> BaseException | None:
    """The lowest rank's user error or stop while starting, if a worker failed with one (every rank checks the same
    config)."""
    for rank in range(nproc):
        path = exchange / ERROR.format(rank=rank)
        if path.is_file():
            with contextlib.suppress(Exception):
                return pickle.loads(path.read_bytes())
    return None


@contextlib.contextmanager
def unnamed_rendezvous_events() -> Iterator[None]:
    """torch's c10d rendezvous names each of its events (about ten per launch) by calling ``inspect.stack()`` twice,
    which reads the source of every frame and searches sys.modules for each: seconds of the launcher's start on a
    busy machine (7 of the 12.6 s before the workers started, profiled at load 20), more than torchrun's default
    static rendezvous pays. The events go to torch's event log, a NullHandler unless configured; their name is
    all that changes here."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    original = getattr(dynamic_rendezvous, "get_method_name", None)
    if original is None:  # another torch: nothing to do
        yield
        return
    dynamic_rendezvous.get_method_name = lambda depth=2: "rendezvous"
    try:
        yield
    finally:
        dynamic_rendezvous.get_method_name = original


@contextlib.contextmanager
def agent_signal_handlers() -> Iterator[None]:
    """The handlers of the signals the agent forwards, as they were before the launch: torch's agent installs its own
    (they raise SignalException) and leaves them installed, so a process that launches and goes on (a test session,
    verify, the demos) would no longer end on SIGTERM."""
    names = [name for name in AGENT_SIGNALS.split(",") if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {getattr(signal, name): signal.getsignal(getattr(signal, name)) for name in names}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """What a worker needs in its environment, set for the launch only (the agent copies this process's environment
    into each worker's): this package on its import path (``python -m disttrain.parallel.worker`` must find the same
    disttrain as this process, also when it is not installed), and this process's id (worker.py)."""
    package_root = str(Path(__file__).resolve().parents[2])
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", PARENT_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [saved["PYTHONPATH"]])])
    os.environ[PARENT_ENV] = str(os.getpid())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def one_thread_per_worker(nproc: int) -> Iterator[None]:
    """OMP_NUM_THREADS=1 for the workers started inside, unless the user set it or nproc is 1.

    torchrun does this when it starts several workers on a node; the elastic API it is built on does not.
    Without it, N workers with torch's default of one intra-op thread per core oversubscribe the cores
    (2 workers on 2 cores: twice the time per step). The elastic agent copies this process's OMP_NUM_THREADS
    into every worker's environment; it is set only for the launch, and this process's own torch, which
    has chosen its thread count already, is left as it was.
    """
    if nproc <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


LAUNCHER_LOG = "launcher.log"
# The agent forwards these to the workers, which stop gracefully on the last three (stop.py); SIGUSR1 is not in
# torch's default list. The launch scripts pass the same list to torchrun (--signals_to_handle).
AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
_AGENT_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


@contextlib.contextmanager
def agent_log(path: Path | None) -> Iterator[None]:
    """Keep torch's elastic agent off the console while workers run: its records (restarts, signals forwarded,
    failures with their tracebacks) go to the file ``path``, or nowhere."""
    handler: logging.Handler = logging.NullHandler()
    if path is not None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _AGENT_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _describe(exc: ChildFailedError, log: Path | None = None) -> str:
    """One line: the first rank that failed for a cause of its own (not only because a peer had died: PeerFailure),
    its exception and message, and the innermost disttrain frame that raised it."""
    lines = []
    for rank, failure in sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0])):
        message, where = failure.message, ""
        if isinstance(message, dict):
            stack = str(message.get("extraInfo", {}).get("py_callstack", ""))
            frames = [m for m in _FRAME.finditer(stack) if "disttrain" in m.group(1)]
            if frames:
                path, line, fn = frames[-1].groups()
                where = f" (in {fn}, {Path(path).name}:{line})"
            message = message.get("message", "")
        if not message and failure.exitcode < 0:
            message = f"killed by {signal.Signals(-failure.exitcode).name}"
        message = (message or f"exit code {failure.exitcode}").strip().splitlines()[-1]
        lines.append((message.startswith("PeerFailure"), f"rank {rank}: {message}{where}"))
    first = min(lines, key=lambda line: line[0])[1]  # (stable: the earliest of those with a cause of their own)
    details = f" (full log: {log})" if log is not None and log.is_file() else ""
    return f"worker failed: {first}{details}"

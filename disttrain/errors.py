"""The error classes every part of disttrain raises for its user, and how each ends a command.

Two kinds, two exit codes, one line each (no traceback):
- :class:`ConfigError` (exit 2): the user asked for something impossible or missing: a bad key or value, an
  impossible batch split, a missing file, wrong usage. Raised before work starts where it can be.
- :class:`RunFailure` (exit 1): a run that started and could not finish: a worker died, a peer stopped
  answering, the gradient became non-finite under ``clip.nonfinite: error``, a benchmark rank failed.
And a stop signal that arrives while a run is starting (:class:`StartupSignals`): one line, 128 + its number.

Every command's entry point goes through :func:`run_command`, the one place exceptions become exit codes.
This module imports nothing of the project (a leaf): every other module may raise these.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_INCONCLUSIVE = 3  # verify: the run's own rounding noise is too large to rule out a known mistake


class ConfigError(ValueError):
    """A user error: one line naming the key, file or option, and what is allowed."""


class RunFailure(RuntimeError):
    """A run that could not complete (a worker or peer failed, a non-finite gradient was an error): one line."""


class StorageError(RunFailure):
    """A file of the run could not be written (no space left, a read-only or vanished directory, no permission):
    one line naming the file, the operating system's error and the newest complete checkpoint."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # a run stops at a step on these (run/stop.py)


class StoppedWhileStarting(BaseException):
    """A stop signal before the run could stop at a step of its own: nothing was trained, nothing to checkpoint.
    A BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} during start-up, before the first step: "
                         "no checkpoint written")


class StartupSignals:
    """While a run starts (config, imports, workers, the model): a stop signal raises :class:`StoppedWhileStarting`
    instead of ending the process silently. Once the run stops at steps on its own (run/stop.py installs its
    handlers on top), :meth:`started` makes any later signal end the process with its default action. Installs
    nothing off the main thread; restores the handlers it replaced on exit."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._started = False

    def __enter__(self) -> StartupSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def started(self) -> None:
        self._started = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._started:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        raise StoppedWhileStarting(signum)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a command that ended with ``exc``; None for an exception that is a bug (re-raised)."""
    if isinstance(exc, StoppedWhileStarting):
        return 128 + exc.signum
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, RunFailure):
        return EXIT_FAILED
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return None


QUIET_WAIT_S = 10.0  # how long a quiet rank leaves local rank 0 to say a user error (and torchrun to stop the group)


def run_command(command: Callable[[], int], stream: TextIO | None = None, quiet_wait_s: float = QUIET_WAIT_S) -> int:
    """``command()``'s exit code; a user error or failed run prints ``disttrain: error: ...`` and its code.

    Under torchrun every rank meets the same user error (a bad key, ``train.device=cuda`` without a GPU): only
    local rank 0 of each node prints it. The other ranks wait for up to ``quiet_wait_s`` first, so that rank 0 is
    the first to exit (torchrun then stops them and reports rank 0's exit code, 2, as the root cause); a rank
    still running after that says the error itself (rank 0 did not meet it) and exits with the same code.
    """
    try:
        return command()
    except (ConfigError, RunFailure, KeyboardInterrupt, StoppedWhileStarting) as exc:
        out = stream or sys.stderr
        if isinstance(exc, ConfigError) and _quiet_rank():
            time.sleep(quiet_wait_s)
        if isinstance(exc, KeyboardInterrupt):
            print("disttrain: interrupted", file=out)
        elif isinstance(exc, StoppedWhileStarting):
            print(f"disttrain: {exc}", file=out)
        else:
            print(f"disttrain: error: {exc}", file=out)
        return exit_code(exc)


def _quiet_rank() -> bool:
    """A worker of torchrun other than the first of its node."""
    env = os.environ
    return "RANK" in env and "WORLD_SIZE" in env and env.get("LOCAL_RANK", "0") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: an exception as one line of an error message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


__all__ = ["ConfigError", "RunFailure", "exit_code", "run_command", "one_line", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_INTERRUPTED", "StorageError", "StartupSignals", "StoppedWhileStarting", "STOP_SIGNALS"]

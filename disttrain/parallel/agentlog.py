"""One console line per worker failure that torch's elastic agent answers with a restart (``--max-restarts``).

launcher.agent_log sends the agent's records (``torch.distributed.elastic``, ``torch.multiprocessing``) to
launcher.log and keeps them off the console; a failure that ends the launch is reported by the launcher
(launcher.WorkerFailure). A failure followed by a restart would then pass unseen but for the resumed run's
``resuming from step S`` line. While :func:`restart_lines` is active, each such failure prints one line::

    disttrain: rank 1 was killed by signal SIGKILL; restarting the worker group (restart 1 of 3)

It reads two of the agent's records: the process context's "failed (exitcode: C) local_rank: R ..." and the
agent's "... attempts left; will restart worker group".
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator

AGENT_LOGGER = "torch.distributed.elastic"  # both records below propagate to it
_PROCESS_API = "torch.distributed.elastic.multiprocessing.api"  # logs "failed (exitcode: ...) local_rank: ..."
_AGENT_API = "torch.distributed.elastic.agent.server.api"  # logs "... attempts left; will restart worker group"


def describe_exit(exitcode: int | None) -> str:
    """``was killed by signal SIGKILL`` for a negative exit code (the process's convention), else the code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class RestartLines(logging.Handler):
    """Keeps the failures the agent reports; says them, one line each, when it announces a restart."""

    def __init__(self, say: Callable[[str], None]):
        super().__init__(logging.DEBUG)
        self.say = say
        self.failed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name == _PROCESS_API and str(record.msg).startswith("failed (exitcode"):
                exitcode, local_rank = record.args[0], record.args[1]  # the format's first two arguments
                self.failed.append(f"rank {local_rank} {describe_exit(exitcode)}")
            elif record.name == _AGENT_API and "will restart worker group" in str(record.msg):
                left, total = record.args[2], record.args[3]  # (role, state, remaining, max_restarts)
                restart = f"restarting the worker group (restart {total - left + 1} of {total})"
                for failure in self.failed or ["a worker failed"]:
                    self.say(f"disttrain: {failure}; {restart}")
                self.failed = []
        except Exception:  # a console line must never break the launch (another torch's format, say)
            self.failed = []


@contextlib.contextmanager
def restart_lines(say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Inside: each worker failure that the agent restarts the group for is said in one line (stderr)."""
    handler = RestartLines(say or (lambda line: print(line, file=sys.stderr, flush=True)))
    logger, agent = logging.getLogger(AGENT_LOGGER), logging.getLogger(_AGENT_API)
    level = agent.level
    logger.addHandler(handler)
    agent.setLevel(logging.INFO)  # the restart announcement is an INFO record; torch sets this logger to WARNING
    try:
        yield
    finally:
        logger.removeHandler(handler)
        agent.setLevel(level)


__all__ = ["RestartLines", "describe_exit", "restart_lines"]

"""Rank 0's console output during training: a tqdm bar on a terminal, plain log lines otherwise.

Only the logger of rank 0 creates a :class:`Progress` (metrics.py), so a run with W processes shows one bar,
never one per rank. The bar goes to stderr and is drawn only when stderr is a terminal; where it is not (CI,
a file, a pipe) every ``log_every``-th step is one plain line on ``lines`` (stdout), which is what logs and
tests read. metrics.jsonl gets every step either way.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, TextIO

from tqdm import tqdm


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """``step    3/20 | loss 2.30 | lr 0.1 | ...``: one step of metrics.jsonl as a log line."""
    fields = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
    return f"step {record['step'] + 1:>4}/{total_steps} | {fields}"


class Progress:
    def __init__(self, total_steps: int, log_every: int, lines: TextIO | None = None,
                 terminal: TextIO | None = None):
        self.total_steps = total_steps
        self.log_every = log_every
        self.lines = lines or sys.stdout
        self.terminal = terminal = terminal or sys.stderr
        self.bar: tqdm | None = None
        if _is_terminal(terminal):
            self.bar = tqdm(total=total_steps, file=terminal, unit="step", desc="train", dynamic_ncols=True,
                            leave=True)

    def update(self, record: dict[str, Any]) -> None:
        """Show step ``record["step"]`` (0-based) with its metrics."""
        step = record["step"]
        last = step == self.total_steps - 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {_fmt(record['loss'])}, lr {_fmt(record['lr'])}", refresh=False)
            self.bar.update(1)
            if last:
                self.close()
        elif step % self.log_every == 0 or last:
            print(format_line(record, self.total_steps), file=self.lines, flush=True)

    def note(self, line: str) -> None:
        """A line of its own, above the bar when there is one."""
        if self.bar is not None:
            tqdm.write(line, file=self.terminal)
        else:
            print(line, file=self.lines, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream: TextIO) -> bool:
    """A terminal a bar can be drawn on: a tty that does not report zero columns (some CI pseudo-terminals do)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return True  # terminal-like but without a file descriptor: trust isatty

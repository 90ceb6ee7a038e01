"""Rank 0's console output: a tqdm bar on a terminal, plain log lines elsewhere, never one bar per rank."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import sys
import termios

import torch

from disttrain.parallel.env import DistEnv
from disttrain.observe.metrics import MetricsLogger
from disttrain.observe.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(step: int) -> dict:
    return {"step": step, "loss": 2.0 / (step + 1), "samples": 32, "lr": 0.05, "grad_norm": 1.5, "skipped": 0}


def test_bar_with_loss_and_lr_on_a_terminal():
    terminal, lines = FakeTerminal(), io.StringIO()
    progress = Progress(20, log_every=5, lines=lines, terminal=terminal)
    for step in range(20):
        progress.update(record(step))
    shown = terminal.getvalue()
    assert "20/20" in shown and "loss 0.1" in shown and "lr 0.05" in shown  # the last step's values
    assert lines.getvalue() == ""  # the bar replaces the log lines
    assert progress.bar is None  # closed after the last step


def test_plain_lines_when_not_a_terminal():
    lines = io.StringIO()
    progress = Progress(10, log_every=5, lines=lines, terminal=io.StringIO())
    for step in range(10):
        progress.update(record(step))
    assert progress.bar is None
    assert [line.split(" | ")[0] for line in lines.getvalue().splitlines()] == [
        "step    1/10", "step    6/10", "step   10/10"]  # every log_every steps, plus the last
    assert "loss 2 | samples 32 | lr 0.05 | grad_norm 1.5 | skipped 0" in lines.getvalue()


def test_only_rank_0_shows_a_bar(tmp_path, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    loggers = [MetricsLogger(tmp_path / str(rank), DistEnv(rank, rank, 2, torch.device("cpu"), "gloo"), 1, 3)
               for rank in range(2)]
    assert loggers[0].progress is not None and loggers[0].progress.bar is not None
    assert loggers[1].progress is None
    for step in range(3):
        for logger in loggers:
            logger.log(record(step))
    shown = terminal.getvalue()
    assert len(re.findall(r"train:\s+0%\|", shown)) == 1  # one bar was started, by rank 0
    assert "3/3" in shown
    quiet = MetricsLogger(tmp_path / "q", DistEnv(0, 0, 1, torch.device("cpu"), None), 1, 3, console=False)
    assert quiet.progress is None  # verify's runs: metrics.jsonl only


def test_a_pseudo_terminal_without_columns_gets_lines():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as term:
            assert Progress(2, 1, lines=io.StringIO(), terminal=term).bar is None  # 0 columns: nothing to draw on
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            progress = Progress(2, 1, lines=io.StringIO(), terminal=term)
            assert progress.bar is not None
            progress.close()
    finally:
        os.close(slave)
        os.close(master)

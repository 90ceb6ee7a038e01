"""Cross-rank reduction of logged scalars, and rank-0 logging (console line, metrics.jsonl, TensorBoard).

The per-step global mean loss needs a collective (every rank holds only its slice's loss sum). A blocking
all_reduce every step costs its latency and makes the ranks wait for each other a second time per step
(gloo, 2 ranks on 2 cores, a 7.7 ms step: 1.8 ms more), so :class:`StepMetrics` keeps each step's loss sum
where it was computed and reduces all pending steps in one packed collective about once a second: the same
exact numbers, one record per step, one collective per second instead of one per step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.format import writing
from ..errors import RunFailure
from ..parallel.collectives import sum_over_ranks
from ..parallel.env import DistEnv
from .progress import Progress
from .runlog import read_records
from .tensorboard import TensorBoardLog


class StepMetrics:
    """Per-step records with the exact global mean loss, reduced over ranks in batches of steps.

    ``record`` keeps this rank's loss sum (a device tensor: no host sync) and the step's other fields;
    ``flush`` reduces every pending step in one all_reduce of [loss sums, sample counts, interval] (float64,
    so sums and counts are exact as before), appends each step's global mean to ``losses`` on every rank and
    hands the records to ``logger`` (rank 0: metrics.jsonl and the console lines due). Every rank must call
    ``flush`` at the same steps; ``record`` flushes by itself every ``interval`` steps, and the interval
    comes out of the collective, so all ranks always agree on it.

    The interval is chosen on rank 0 from its measured time per step, so that a flush comes about every
    ``flush_seconds`` (console lines are then at most that late), doubling at most per flush and capped at
    ``max_interval`` steps. It starts at 1 (the first step is reported at once). ``flush_seconds=0``: a
    collective every step, as a plain per-step all_reduce; ``math.inf``: intervals 1, 2, 4, ... (tests).
    """

    flush_seconds: float = 1.0
    max_interval: int = 1000

    def __init__(self, logger: MetricsLogger, env: DistEnv, losses: list[float] | None = None):
        self.logger = logger
        self.env = env
        self.losses = [] if losses is None else losses  # global mean loss of every flushed step
        self.interval = 1
        self.flushes = 0
        self._loss_sums: list[torch.Tensor] = []
        self._counts: list[int | torch.Tensor] = []  # this rank's samples, or target tokens (a device tensor)
        self._pending: list[tuple[int, dict[str, Any]]] = []  # (step, other fields)
        self._since = time.perf_counter()

    def record(self, step: int, loss_sum: torch.Tensor, count: int | torch.Tensor, **fields: Any) -> None:
        """Step ``step``: this rank's summed loss over its ``count`` samples, or over ``count`` target tokens when
        it is a tensor (a token loss's count, run/loss.py: left on the device); ``fields`` go to the record as is.
        A token run's records hold ``tokens`` (the global count of the step) and ``tokens_per_s``."""
        self._loss_sums.append(loss_sum.detach().reshape(()).to(torch.float64))
        self._counts.append(count)
        self._pending.append((step, fields))
        if len(self._pending) >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Reduce and log every pending step (a collective: all ranks call it at the same step)."""
        n = len(self._pending)
        if n == 0:
            return
        sums = torch.stack(self._loss_sums)
        # Counts and rank 0's next interval ride in the same buffer: one collective per flush. Others add 0
        # to the interval slot, so every rank reads rank 0's choice.
        tokens = isinstance(self._counts[0], torch.Tensor)
        if tokens:
            counts = torch.stack([c.reshape(()).to(torch.float64) for c in self._counts])
        else:
            counts = torch.tensor([float(c) for c in self._counts], dtype=torch.float64, device=sums.device)
        interval = float(self._next_interval(n)) if self.env.is_main else 0.0
        buf = torch.cat([sums, counts, torch.tensor([interval], dtype=torch.float64, device=sums.device)])
        sum_over_ranks(buf, self.env)
        values = buf.tolist()  # the one read back to the host
        records = []
        for i, (step, fields) in enumerate(self._pending):
            total_loss, count = values[i], values[n + i]
            if count == 0:  # only a token loss can count nothing; the same on every rank: all stop here
                raise RunFailure(f"step {step}: the global batch has no target token (every target is -100), so "
                                 "it has no per-token mean loss")
            self.losses.append(total_loss / count)
            record = {"step": step, "loss": total_loss / count, ("tokens" if tokens else "samples"): int(count)}
            if tokens and fields.get("ms"):
                record["tokens_per_s"] = round(1000.0 * count / fields["ms"], 1)
            records.append({**record, **fields})
        self.logger.log(*records)
        self.interval = int(values[2 * n])
        self.flushes += 1
        self._loss_sums, self._counts, self._pending = [], [], []
        self._since = time.perf_counter()

    def _next_interval(self, steps: int) -> int:
        per_step = (time.perf_counter() - self._since) / steps
        fit = self.flush_seconds / per_step if per_step > 0 else math.inf
        return max(1, min(2 * self.interval, self.max_interval, int(fit) if math.isfinite(fit) else self.max_interval))


TOKEN_USE_NOTE = 0.5  # below this fraction of real target tokens in a step, a token run says so once


class MetricsLogger:
    """Rank 0 appends every step to ``metrics.jsonl`` and prints every ``log_every`` steps; others do nothing.

    ``start_step`` > 0 (a resumed run): the records of steps before it are kept and every later one is
    dropped, so after any number of resumes the file holds exactly one record per step.
    """

    def __init__(self, out_dir: Path, env: DistEnv, log_every: int, total_steps: int, console: bool = True,
                 stream=None, start_step: int = 0, tensorboard: bool = False, token_positions: int | None = None,
                 seq_len: int = 0):
        self.enabled = env.is_main
        # A token run: target positions per step (global batch x data.seq_len), to say once when most are padding.
        self.token_positions, self.seq_len = token_positions, seq_len
        self.console = console
        self.log_every = log_every
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.path = Path(out_dir) / "metrics.jsonl"
        # Rank 0 only: one progress bar (or one stream of log lines) per run, never one per rank.
        self.progress = Progress(total_steps, log_every, self.stream) if self.enabled and console else None
        if self.enabled:
            kept = [r for r in read_records(self.path) if r["step"] < start_step] if start_step else []
            with writing(self.path, out_dir):
                self.path.parent.mkdir(parents=True, exist_ok=True)  # at the start only: later writes never recreate it
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard = TensorBoardLog(out_dir, start_step) if self.enabled and tensorboard else None

    def log(self, *records: dict[str, Any]) -> None:
        """Append ``records`` (one per step) to metrics.jsonl, and print the console lines that are due."""
        if not self.enabled or not records:
            return
        with writing(self.path, self.path.parent), self.path.open("a") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
        if self.tensorboard is not None:
            self.tensorboard.log(records)
        if self.progress is not None:
            for record in records:
                self.progress.update(record)
        if self.token_positions and self.console and "tokens" in records[0]:
            self._token_use(records[0]["step"], records[0]["tokens"])

    def _token_use(self, step: int, tokens: int) -> None:
        """Once per run: a line when less than half of the first step's positions hold a target token (documents
        far shorter than data.seq_len are padded; each step then computes mostly on padding)."""
        positions, self.token_positions = self.token_positions, None
        if tokens < TOKEN_USE_NOTE * positions:
            line = (f"data: step {step + 1} has {tokens} target tokens in {positions} positions "
                    f"({tokens / positions:.0%}"
                    f"): most documents are shorter than data.seq_len={self.seq_len} and the rest is padding; "
                    "data.pack=true or a smaller data.seq_len uses more of each step")
            if self.progress is not None:
                self.progress.note(line)
            else:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

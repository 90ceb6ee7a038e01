"""Cross-rank reduction of logged scalars, and rank-0 logging (console line + metrics.jsonl)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .dist import DistEnv
from .progress import Progress


def all_reduce_sum(values: Sequence[float | torch.Tensor], env: DistEnv) -> list[float]:
    """Sum scalars over ranks: packed into one float64 buffer, so one collective however many values."""
    buf = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in values]).to(env.device)
    if env.is_distributed:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


class MetricsLogger:
    """Rank 0 appends every step to ``metrics.jsonl`` and prints every ``log_every`` steps; others do nothing."""

    def __init__(self, out_dir: Path, env: DistEnv, log_every: int, total_steps: int, console: bool = True,
                 stream=None):
        self.enabled = env.is_main
        self.console = console
        self.log_every = log_every
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.path = Path(out_dir) / "metrics.jsonl"
        # Rank 0 only: one progress bar (or one stream of log lines) per run, never one per rank.
        self.progress = Progress(total_steps, log_every, self.stream) if self.enabled and console else None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress.update(record)


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

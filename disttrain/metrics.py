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


def all_reduce_sum(values: Sequence[float | torch.Tensor], env: DistEnv) -> list[float]:
    """Sum scalars over ranks: packed into one float64 buffer, so one collective however many values."""
    buf = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in values]).to(env.device)
    if env.is_distributed:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


class MetricsLogger:
    """Rank 0 appends every step to ``metrics.jsonl`` and prints every ``log_every`` steps; others do nothing.

    ``start_step`` > 0 (a resumed run): the records of steps before it are kept and every later one is
    dropped, so after any number of resumes the file holds exactly one record per step.
    """

    def __init__(self, out_dir: Path, env: DistEnv, log_every: int, total_steps: int, console: bool = True,
                 stream=None, start_step: int = 0):
        self.enabled = env.is_main
        self.console = console
        self.log_every = log_every
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = [r for r in _read_records(self.path) if r["step"] < start_step] if start_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def flush(self) -> None:
        """Every step logged so far is in metrics.jsonl (called before a checkpoint is written)."""

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.console and (step % self.log_every == 0 or step == self.total_steps - 1):
            fields = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
            print(f"step {step + 1:>4}/{self.total_steps} | {fields}", file=self.stream, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Reading a run directory's metrics.jsonl: one record per step, written by rank 0 (metrics.py).

The one reader for every consumer (resume, verify, step-wise verify, the demos, ``disttrain plot``). A torn last
line (a process killed mid-write) is dropped, not an error. This module does not import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

METRICS = "metrics.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The step records in the file ``path`` ([] if it does not exist); torn or foreign lines are skipped."""
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; a missing directory, file or empty log is a one-line ConfigError."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS} (train into it first)")
    try:
        records = read_records(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from None
    if not records:
        raise ConfigError(f"{path}: empty (the run logged no step)")
    return records


__all__ = ["METRICS", "read_records", "read_metrics"]

"""TensorBoard event files of a run: rank 0 writes every step's scalars to ``train.out_dir/tensorboard/``.

    tensorboard --logdir runs/demo/tensorboard

Tags: ``train/loss`` (the global mean loss), ``train/lr``, ``train/grad_norm`` (before clipping), ``train/step_ms``
and ``train/samples_per_s`` (the global batch over the step's time), at the step's index as in metrics.jsonl. The
records arrive when the metrics are reduced over ranks (metrics.py), a batch of steps at a time. A resumed run
opens the directory with ``purge_step`` at its first step, so TensorBoard drops whatever an interrupted run wrote
after its checkpoint and the curves continue without duplicate steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EVENTS_DIR = "tensorboard"


class TensorBoardLog:
    def __init__(self, out_dir: str | Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only on the rank that writes

        self.writer = SummaryWriter(str(Path(out_dir) / EVENTS_DIR), purge_step=start_step if start_step else None)

    def log(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            step = r["step"]
            self.writer.add_scalar("train/loss", r["loss"], step)
            for key in ("lr", "grad_norm"):
                if r.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", r[key], step)
            if r.get("ms"):
                self.writer.add_scalar("train/step_ms", r["ms"], step)
                if "samples" in r:
                    self.writer.add_scalar("train/samples_per_s", 1000.0 * r["samples"] / r["ms"], step)
            if "tokens" in r:  # token losses (run/loss.py): the step's target tokens over all ranks, and per second
                self.writer.add_scalar("train/tokens", r["tokens"], step)
                if r.get("tokens_per_s") is not None:
                    self.writer.add_scalar("train/tokens_per_s", r["tokens_per_s"], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["TensorBoardLog", "EVENTS_DIR"]

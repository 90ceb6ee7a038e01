"""The rounding twin: the one-process reference again, in another floating-point summation order.

The twin reads every global batch with its samples in a seeded order (data/batching.py within_batch_order),
each sample keeping its own keys (randomness.py: the position it has in the global batch), so its dropout
masks and augmentation follow it. Everything the step computes is invariant to that permutation: the summed
loss and its divisor, the weight gradients (sums over samples), SyncBatchNorm's statistics (sums over the
batch), token counts, the clipping norm, the optimizer. Only the order of each sum changes, so the twin equals
the reference exactly in real arithmetic (tests/test_verdicts.py: to ~1e-15 in float64 for an MLP, a SyncBN CNN,
dropout with augmentation), and its distance from the reference is the run's own rounding noise.

Under gradient accumulation the permutation also moves samples between micro-batches; the summed loss over a
fixed divisor (run/step.py) keeps that invariant too, except for batch-norm statistics per micro-batch, a
config whose equivalence is not claimed anyway (whole.py unclaimed_reason).
"""

from __future__ import annotations

from pathlib import Path

from ..run.train import Hook, TrainResult, Trainer
from ..config.schema import Config
from ..parallel.env import DistEnv
from .chunked import chunk_weight_gradients

TWIN_ORDER = 1  # the seed of the twin's within-batch order (any fixed value: the twin must be reproducible)


class RoundingTwin(Hook):
    """Makes a run the twin of its reference, once the parts are built (before the first step): each batch is read
    in the twin's order, and weight gradients are summed over ``chunks`` slices of it (chunked.py)."""

    def __init__(self, chunks: int = 2, order: int = TWIN_ORDER):
        self.chunks, self.order = chunks, order

    def on_start(self, trainer: Trainer) -> None:
        trainer.parts.batches.order = self.order
        chunk_weight_gradients(trainer.parts.sync.model, self.chunks)


def train_twin(cfg: Config, env: DistEnv, chunks: int = 2, resume: bool | str | Path = False,
               stop_at: int | None = None, allow: frozenset[str] = frozenset()) -> TrainResult:
    """Train ``cfg`` as the twin of a one-process reference (``env``: world size 1), its weight gradients summed over
    ``chunks`` slices of the batch (the world size of the run it calibrates: the same kind of partial sums)."""
    if env.world_size != 1:
        raise RuntimeError("the rounding twin is a one-process run")
    return Trainer(cfg, env, (RoundingTwin(chunks),), console=False).run(resume, stop_at, allow)


__all__ = ["RoundingTwin", "train_twin", "TWIN_ORDER"]

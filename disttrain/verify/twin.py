"""verify's one-process runs: the reference and its rounding twins, all reading each batch as the ranks did.

**The reference** trains the config in one process on every global batch, and rounds the way W processes do: it
reads step k's global batch as the W ranks read it (micro-batch j made of every rank's j-th micro-batch,
data/loader.py split) and sums each Linear/Conv weight gradient over the ranks' slices, each partial sum rounded
alone (chunked.py), as a rank's leaves its matmul before the all_reduce adds it. In exact arithmetic that is the one
device on the global batch (the partial sums add up to the same gradient; tests/test_verdicts.py checks it to
~1e-15 in float64); in floating point it is the rounding of the W-process run's partition, which under bf16/fp16
autocast is most of how far W processes drift from a one-op reference (measured: a bf16 SyncBN CNN 20 steps, the
parameters 2.1e-2 apart from the one-op reference, 7.6e-4 from this one). A mistake in the communication
(the average's weights, the statistics, clipping, a lost all_reduce) is not in the reference, and moves the run
as far from it as from the one-op reference.

**The twin** is the reference again with the ranks' parts of every micro-batch in reverse order (rank W-1's
samples first), every sample keeping its own keys (randomness.py: its dropout mask and augmentation follow it).
Everything the step computes is invariant to that order: the summed loss and its divisor, the weight gradients (the
same per-rank partial sums, added in the other order), SyncBatchNorm's statistics (sums over the batch), token
counts, the clipping norm, the optimizer. So the twin equals the reference exactly in real arithmetic, and differs
from it in what a W-process run changes: the order in which the ranks' contributions are added (the all_reduce,
SyncBatchNorm's reduction, the loss). Its distance from the reference is the run's own rounding noise, amplified by
this config over this many steps.

One twin is one sample of that noise, and in half precision a sample can land far too close: a reordering whose
rounding happens not to flip a single bf16 value, two ranks' sums that commute exactly (measured: one rank-order
twin of a correct bf16 SyncBN run 15x closer to the reference than the run itself, another 2.5e5x). So before a
run is called anything but EQUIVALENT, verify trains **the second twin**: the reference with each rank's samples in
a seeded order (data/batching.py within_batch_order), which also reorders the float32 accumulation inside every
matmul, a larger perturbation than the run's own; the larger of the two noises decides (verdict.calibrated_noise).

Under ``train.compile`` each Linear/Conv runs its slices inside the compiled code of its block, as each rank runs its
own slice. Shapes stay static there: the one-process runs compile the same code for other slice layouts (the
reference, then its twins, then each segment), and dynamo's automatic dynamic shapes would then recompile it with the
slice sizes as symbols, which inductor's CPU backend cannot lay out (``cannot determine truth value of Relational:
3*s69*s87 < 3``, measured on configs/demo.yaml at W=2). Each layout gets its own static graph instead: a recompile,
not a symbolic shape.

Under gradient accumulation the second twin's order moves samples between a rank's micro-batches; the summed loss
over a fixed divisor (run/step.py) keeps that invariant too, except for batch-norm statistics per micro-batch, a
config whose equivalence is not claimed anyway (whole.py unclaimed_reason).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config.schema import Config
from ..parallel.env import DistEnv, threads_of_a_worker
from ..run.train import Hook, TrainResult, Trainer
from .chunked import chunk_weight_gradients

TWIN_ORDER = 1  # the seed of the second twin's within-slice order (any fixed value: the twin must be reproducible)
RANK_ORDER, SAMPLE_ORDER = "rank order", "sample order"  # the twin, and the second twin
TWINS = (RANK_ORDER, SAMPLE_ORDER)


class AsRanks(Hook):
    """Makes a one-process run read and round as ``ranks`` ranks would, once the parts are built (before the first
    step): micro-batches made of the ranks' own, Linear/Conv layers run slice by slice (chunked.py); ``twin``
    RANK_ORDER: the ranks' parts in reverse order; SAMPLE_ORDER: each rank's samples in a seeded order (None: the
    reference)."""

    def __init__(self, ranks: int, twin: str | None = None):
        if twin not in (None, *TWINS):
            raise ValueError(f"twin: {twin!r} is none of {TWINS}")
        self.ranks, self.twin = ranks, twin
        self._dynamic: bool | None = None
        self._threads = contextlib.ExitStack()

    def on_start(self, trainer: Trainer) -> None:
        # The intra-op threads one of those ranks would have (parallel/env.py), unless the user chose.
        self._threads.enter_context(threads_of_a_worker(self.ranks))
        if trainer.cfg.train.compile:  # static shapes per slice layout (see the module docstring)
            self._dynamic = torch._dynamo.config.automatic_dynamic_shapes
            torch._dynamo.config.automatic_dynamic_shapes = False
        batches = trainer.parts.batches
        batches.ranks = self.ranks
        batches.rank_order = tuple(reversed(range(self.ranks))) if self.twin == RANK_ORDER else None
        batches.order = TWIN_ORDER if self.twin == SAMPLE_ORDER else None
        if self.ranks > 1 or self.twin is not None:
            chunk_weight_gradients(trainer.parts.sync.model, self.ranks, batches.rank_order)

    def on_end(self, trainer: Trainer) -> None:
        if self._dynamic is not None:
            torch._dynamo.config.automatic_dynamic_shapes, self._dynamic = self._dynamic, None
        self._threads.close()


def train_reference(cfg: Config, env: DistEnv, ranks: int, twin: str | None = None, resume: bool | str | Path = False,
                    stop_at: int | None = None, allow: frozenset[str] = frozenset(), hooks: tuple[Hook, ...] = ()
                    ) -> TrainResult:
    """Train ``cfg`` in this process (``env``: world size 1) as verify's reference of a ``ranks``-rank run, or as one
    of its rounding twins (``twin``: RANK_ORDER or SAMPLE_ORDER); ``hooks`` after the one that reads as the ranks
    (drawhook.RecordDraws, mistakes.AsMistake)."""
    if env.world_size != 1:
        raise RuntimeError("the reference and its rounding twins are one-process runs")
    return Trainer(cfg, env, (AsRanks(ranks, twin), *hooks), console=False).run(resume, stop_at, allow)


__all__ = ["AsRanks", "train_reference", "TWIN_ORDER", "RANK_ORDER", "SAMPLE_ORDER", "TWINS"]

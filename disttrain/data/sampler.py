"""``GlobalBatchSampler``: the trainer's exact batch split as a torch batch sampler, for loops of one's own.

Step k's global batch is positions [kB, (k+1)B) of the stream made of one seeded permutation of the dataset per
epoch (batching.py: the same arithmetic the trainer uses). This rank yields the indices of its contiguous slice
of it, B//W + (1 if r < B%W else 0) samples: the W slices together are exactly the batch one device would take,
with no padding and no repeated sample (torch's DistributedSampler pads and strides instead). Nothing is
communicated: every rank computes the same permutation from (seed, epoch).

Use it as ``DataLoader(dataset, batch_sampler=sampler)``. One pass (a ``for`` loop over the loader) yields the
steps from ``sampler.step`` to the end of its epoch of N//B steps, so the first pass after a mid-epoch resume
(``start_step``) is shorter; the N%B samples a pass leaves start the next batch, since the stream runs on into
the next permutation (nothing dropped, nothing padded). ``len()`` is the length of the current (or next) pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..parallel.collectives import rank_and_world_size
from ..randomness import SampleKeys
from .batching import global_batch_indices, local_slice


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's slice of every step's global batch of ``global_batch_size`` samples (see the module docstring).

    ``rank`` and ``world_size`` default to the default process group's (0 and 1 without one); ``start_step``: the
    optimizer step to start from (O(1): nothing before it is replayed). ``step`` is the step of the next batch
    this sampler yields (DataLoader workers read ahead of training: for a checkpoint, count the steps trained).
    """

    def __init__(self, num_samples: int, global_batch_size: int, *, seed: int, rank: int | None = None,
                 world_size: int | None = None, start_step: int = 0):
        if (rank is None) != (world_size is None):
            raise ValueError("GlobalBatchSampler: give both rank and world_size, or neither (the process group's)")
        if rank is None:
            rank, world_size = rank_and_world_size()
        if not 1 <= global_batch_size <= num_samples:
            raise ValueError(f"GlobalBatchSampler: global_batch_size {global_batch_size} must be in [1, num_samples="
                             f"{num_samples}]; a global batch may not repeat a sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatchSampler: rank {rank} is not in [0, world_size={world_size})")
        if world_size > global_batch_size:
            raise ValueError(f"GlobalBatchSampler: global_batch_size {global_batch_size} cannot be split over "
                             f"{world_size} ranks: every rank needs at least one sample")
        if start_step < 0:
            raise ValueError(f"GlobalBatchSampler: start_step must be >= 0, got {start_step}")
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.slice = local_slice(global_batch_size, world_size, rank)
        self.steps_per_epoch = num_samples // global_batch_size
        self.step = start_step
        self._pass: range | None = None  # the steps of the pass in progress

    @property
    def local_batch_size(self) -> int:
        """How many samples this rank holds in every step."""
        return self.slice.stop - self.slice.start

    def indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's slice of step ``step``'s global batch."""
        return global_batch_indices(step, self.global_batch_size, self.num_samples, self.seed)[self.slice].tolist()

    def keys(self, step: int) -> SampleKeys:
        """The keys of this rank's samples at ``step`` (their positions in the global batch), for per-sample
        randomness that does not depend on the world size: ``with disttrain.sample_keys(sampler.keys(step))``
        around the forward of a model with ``disttrain.convert_dropout``."""
        return SampleKeys(self.seed, step, torch.arange(self.slice.start, self.slice.stop))

    def _next_pass(self) -> range:
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        return range(self.step, end)

    def __len__(self) -> int:
        return len(self._pass if self._pass is not None else self._next_pass())

    def __iter__(self) -> Iterator[list[int]]:
        self._pass = steps = self._next_pass()
        try:
            for step in steps:
                self.step = step + 1
                yield self.indices(step)
        finally:
            self._pass = None


__all__ = ["GlobalBatchSampler"]

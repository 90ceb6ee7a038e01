"""This rank's micro-batches of every step, read from any :class:`~.source.Source`.

Step k's global batch is a pure function of (seed, k) (batching.py); this rank fetches only its contiguous
slice of it, augments each sample from its keys (seed, step, position in the global batch), and cuts the slice
into micro-batches. Nothing carries state from one step to the next, so a run can start at any step (resume
is O(1)) and the samples, their order and their augmentation do not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..randomness import SampleKeys
from .augment import augment_images
from .batching import global_batch_indices, local_slice
from .source import Source

MicroBatch = tuple[torch.Tensor, torch.Tensor, SampleKeys]


class GlobalBatches:
    """This rank's slice of every step's global batch."""

    def __init__(self, dataset: Source, global_batch_size: int, seed: int, rank: int, world_size: int):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.slice = local_slice(global_batch_size, world_size, rank)

    @property
    def local_batch_size(self) -> int:
        return self.slice.stop - self.slice.start

    def indices(self, step: int) -> np.ndarray:
        return global_batch_indices(step, self.global_batch_size, len(self.dataset), self.seed)[self.slice]

    def keys(self, step: int) -> SampleKeys:
        """The samples this rank holds at ``step``: their positions in the global batch."""
        return SampleKeys(self.seed, step, torch.arange(self.slice.start, self.slice.stop))

    def keyed_batch(self, step: int, device: torch.device) -> MicroBatch:
        """This rank's (x, y) of ``step``, augmented per sample, and the samples' keys."""
        keys = self.keys(step)
        x, y = self.dataset.fetch(self.indices(step))
        x = augment_images(x.to(device), keys, self.dataset.augment, self.dataset.crop_padding)
        return x, y.to(device), keys

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.keyed_batch(step, device)
        return x, y

    def keyed_micro_batches(self, step: int, device: torch.device, k: int) -> list[MicroBatch]:
        """This rank's batch cut into ``k`` contiguous micro-batches, sized like rank slices (b//k, +1 first),
        each with its samples' keys."""
        return split(self.keyed_batch(step, device), k)

    def micro_batches(self, step: int, device: torch.device, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`keyed_micro_batches` without the keys."""
        return [(x, y) for x, y, _ in self.keyed_micro_batches(step, device, k)]

    def steps(self, start: int, stop: int, device: torch.device, k: int) -> Iterator[tuple[int, list[MicroBatch]]]:
        """(step, its micro-batches) for every step in [start, stop), in order: what the training loop consumes."""
        for step in range(start, stop):
            yield step, self.keyed_micro_batches(step, device, k)

    def close(self) -> None:
        """Release what reading holds (nothing when batches are read in this process)."""


def split(batch: MicroBatch, k: int) -> list[MicroBatch]:
    """``batch`` cut into ``k`` contiguous micro-batches, sized like rank slices (b//k, +1 for the first b%k)."""
    x, y, keys = batch
    return [(x[s], y[s], keys.select(s)) for s in (local_slice(len(y), k, j) for j in range(k))]


__all__ = ["GlobalBatches", "MicroBatch", "split"]

"""The global batch is the unit of data: which samples step k holds, and which of them this rank holds.

For optimizer step k, every rank computes the same global batch: positions [kB, (k+1)B) of an endless
stream made of one seeded permutation of the dataset per epoch (the same permutation on all ranks,
because it depends only on (seed, epoch)). Rank r then takes a contiguous slice of that batch of size
B//W + (1 if r < B%W else 0). The union of the W slices is exactly the single-device batch, for any
W <= B: no padding and no repeated samples (unlike torch's DistributedSampler, which pads the last
batch by repeating samples and strides across the dataset).

Each sample of a step's batch is named by (step, its position in the global batch); augmentation draws
from those keys (randomness.py), so a sample is cropped and flipped the same way on any rank.
"""

from __future__ import annotations

import functools

import numpy as np


def local_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """Samples rank ``rank`` holds: B//W, plus one for the first B%W ranks."""
    base, extra = divmod(global_batch_size, world_size)
    return base + (1 if rank < extra else 0)


def local_slice(global_batch_size: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous slice of the global batch."""
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + local_batch_size(global_batch_size, world_size, rank))


@functools.lru_cache(maxsize=4)  # consecutive steps share an epoch: one permutation per epoch, not per step
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch), identical on every rank."""
    permutation = np.random.default_rng([seed, epoch]).permutation(num_samples)
    permutation.flags.writeable = False  # shared by every caller through the cache
    return permutation


def global_batch_indices(step: int, global_batch_size: int, num_samples: int, seed: int) -> np.ndarray:
    """Dataset indices of optimizer step ``step``'s global batch (positions [kB, (k+1)B), epochs wrapping)."""
    if global_batch_size > num_samples:
        raise ValueError(f"global batch {global_batch_size} larger than the dataset ({num_samples})")
    start = step * global_batch_size
    stop = start + global_batch_size
    first_epoch, last_epoch = start // num_samples, (stop - 1) // num_samples
    stream = np.concatenate([epoch_permutation(num_samples, seed, e) for e in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * num_samples
    return stream[offset: offset + global_batch_size]


def rank_parts(size: int, ranks: int, order: tuple[int, ...] | None = None) -> list[tuple[int, slice]]:
    """(rank, its slice) of a batch of ``size`` laid out as ``ranks`` ranks' parts one after another, in ``order``
    (default: rank 0 first). Part r holds local_batch_size(size, ranks, r) samples: the ranks' slices of a global
    batch, and of each micro-batch made of their j-th micro-batches (data/loader.py split)."""
    start, parts = 0, []
    for r in order or range(ranks):
        n = local_batch_size(size, ranks, r)
        parts.append((r, slice(start, start + n)))
        start += n
    return parts


def within_batch_order(order: int, step: int, size: int, parts: int = 1) -> np.ndarray:
    """A seeded reordering of the ``size`` samples one process reads at ``step``: a pure function of (order, step,
    size, parts) that moves every sample within its own slice of ``parts`` (:func:`local_slice`), so a one-process
    run that reads the batch as ``parts`` ranks would (verify/twin.py) keeps each rank's samples together.

    verify's second twin (verify/twin.py) reads each batch in this order; every sample keeps its own keys, so it
    computes the same sums in another order."""
    rng = np.random.default_rng([order, step])
    result = np.arange(size)
    for part in (local_slice(size, parts, j) for j in range(parts)):
        result[part] = part.start + rng.permutation(part.stop - part.start)
    return result


__all__ = ["local_batch_size", "local_slice", "rank_parts", "epoch_permutation", "global_batch_indices",
           "within_batch_order"]

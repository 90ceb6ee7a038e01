"""The global batch is the unit of data.

For optimizer step k, every rank computes the same global batch: positions [kB, (k+1)B) of an endless
stream made of one seeded permutation of the dataset per epoch (the same permutation on all ranks,
because it depends only on (seed, epoch)). Rank r then takes a contiguous slice of that batch of size
B//W + (1 if r < B%W else 0). The union of the W slices is exactly the single-device batch, for any
W <= B: no padding and no repeated samples (unlike torch's DistributedSampler, which pads the last
batch by repeating samples and strides across the dataset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError, DataConfig


# --------------------------------------------------------------------------- sharding arithmetic

def local_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """Samples rank ``rank`` holds: B//W, plus one for the first B%W ranks."""
    base, extra = divmod(global_batch_size, world_size)
    return base + (1 if rank < extra else 0)


def local_slice(global_batch_size: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous slice of the global batch."""
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + local_batch_size(global_batch_size, world_size, rank))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch), identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


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


# --------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    """A whole dataset held in memory: inputs ``x`` (N, *shape) and integer labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _synthetic(cfg: DataConfig, image: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each class a random prototype (a vector, or a 3x8x8 image), each sample its prototype plus noise:
    learnable by the mlp and the cnn alike, and seeded."""
    rng = np.random.default_rng([seed, 2024])
    shape = (3, 8, 8) if image else (32,)
    y = rng.integers(0, cfg.num_classes, cfg.num_samples)
    prototypes = rng.standard_normal((cfg.num_classes, *shape))
    x = prototypes[y] + rng.standard_normal((cfg.num_samples, *shape))
    return x, y, cfg.num_classes


def _digits(cfg: DataConfig, image: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's bundled 8x8 handwritten digits (read from the package, no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data.name=digits needs scikit-learn: pip install 'disttrain[digits]'") from None
    digits = load_digits()
    keep = np.sort(np.random.default_rng([seed, 1797]).permutation(len(digits.target))[: cfg.num_samples])
    x = digits.images[keep] / 16.0  # pixel values 0..16
    x = (x - 0.3) / 0.35  # roughly zero mean, unit variance
    x = x[:, None, :, :] if image else x.reshape(len(keep), 64)
    return x, digits.target[keep], 10


def build_dataset(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype) -> Dataset:
    """The dataset in the shape the model wants: vectors for the mlp, (C, 8, 8) images for the cnn."""
    make = {"synthetic": _synthetic, "digits": _digits}[cfg.name]
    x, y, num_classes = make(cfg, model_name == "cnn", seed)
    return Dataset(torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long), num_classes)


class GlobalBatches:
    """This rank's slice of every step's global batch."""

    def __init__(self, dataset: Dataset, global_batch_size: int, seed: int, rank: int, world_size: int):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.slice = local_slice(global_batch_size, world_size, rank)

    @property
    def local_batch_size(self) -> int:
        return self.slice.stop - self.slice.start

    def indices(self, step: int) -> np.ndarray:
        return global_batch_indices(step, self.global_batch_size, len(self.dataset), self.seed)[self.slice]

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.indices(step))
        return self.dataset.x[idx].to(device), self.dataset.y[idx].to(device)

    def micro_batches(self, step: int, device: torch.device, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batch cut into ``k`` contiguous micro-batches, sized like rank slices (b//k, +1 first)."""
        x, y = self.batch(step, device)
        return [(x[s], y[s]) for s in (local_slice(len(y), k, j) for j in range(k))]

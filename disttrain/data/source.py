"""What the trainer needs of a dataset: samples read by index, a batch at a time, and their shape.

Every format (in memory, a map-style dataset from a factory, arrays on disk, an image folder) is a
:class:`Source`: ``fetch(indices)`` returns the inputs and targets of exactly those samples, in that order,
as tensors, reading nothing else. Augmentation is not the source's business: it is drawn from the samples'
keys after the fetch (augment.py), so the same sample is augmented the same way whoever fetches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..randomness import SampleKeys


class Source:
    """A dataset read by index. ``num_classes``: the model's output width (classes, or mse targets per sample);
    ``augment`` / ``crop_padding``: applied to image batches after the fetch (data.augment)."""

    num_classes: int
    augment: str = "none"
    crop_padding: int = 1

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def fetch(self, indices: np.ndarray, keys: SampleKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (n, *input_shape) and targets of the samples at ``indices``, in that order. ``keys``: the samples'
        keys (randomness.py), for a source whose own transforms draw from them."""
        raise NotImplementedError

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` inputs (a model factory's output shape is checked on them)."""
        return self.fetch(np.arange(min(n, len(self))))[0]


@dataclass
class Dataset(Source):
    """A whole dataset held in memory: inputs ``x`` (N, *shape) and targets ``y``: integer labels (N,) for
    cross entropy, or float targets (N, num_classes) for mse."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    augment: str = "none"
    crop_padding: int = 1

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def fetch(self, indices: np.ndarray, keys: SampleKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return self.x[idx], self.y[idx]


__all__ = ["Source", "Dataset"]

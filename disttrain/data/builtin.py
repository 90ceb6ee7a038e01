"""The built-in datasets, held in memory: seeded synthetic prototypes, and scikit-learn's 8x8 digits."""

from __future__ import annotations

import numpy as np
import torch

from ..config.schema import DataConfig
from ..errors import ConfigError
from .source import Dataset, Source


def synthetic(cfg: DataConfig, image: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each class a random prototype (a vector, or a 3x8x8 image), each sample its prototype plus noise:
    learnable by the mlp and the cnn alike, and seeded."""
    rng = np.random.default_rng([seed, 2024])
    shape = (3, 8, 8) if image else (32,)
    y = rng.integers(0, cfg.num_classes, cfg.num_samples)
    prototypes = rng.standard_normal((cfg.num_classes, *shape))
    x = prototypes[y] + rng.standard_normal((cfg.num_samples, *shape))
    return x, y, cfg.num_classes


def digits(cfg: DataConfig, image: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
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


BUILTIN = {"synthetic": synthetic, "digits": digits}


def open_source(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype, loss: str) -> Source:
    """Vectors for the mlp, (C, 8, 8) images for every other model; held in memory."""
    x, y, num_classes = BUILTIN[cfg.name](cfg, model_name != "mlp", seed)
    return Dataset(torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long), num_classes)

"""What the on-disk formats (arrays.py, imagefolder.py) share: the directory check, the seeded subset of
data.num_samples, per-channel normalisation, and the error of a sample that cannot be read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.schema import DataConfig
from ..errors import ConfigError, RunFailure


class DataReadError(RunFailure):
    """A sample could not be read while training (a corrupt or vanished file): one line naming the file."""


def data_dir(cfg: DataConfig) -> Path:
    """data.path as a directory that exists (ConfigError otherwise)."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path: {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"data.path: {path} is not a directory")
    return path


def subset(total: int, cfg: DataConfig, seed: int, what: str) -> np.ndarray:
    """The file indices the dataset holds: all ``total`` of them (data.num_samples 0), or a seeded subset of
    data.num_samples, in file order (ConfigError when there are fewer)."""
    if cfg.num_samples == 0:
        return np.arange(total)
    if cfg.num_samples > total:
        raise ConfigError(f"data.num_samples: {cfg.num_samples} exceeds the {total} samples of {what}")
    return np.sort(np.random.default_rng([seed, total]).permutation(total)[: cfg.num_samples])


class Normalize:
    """(x - mean) / std per channel of inputs (n, C, ...), or nothing when data.mean and data.std are empty."""

    def __init__(self, cfg: DataConfig, channels: int, dtype: torch.dtype):
        self.mean = self.std = None
        if cfg.mean:
            if len(cfg.mean) != channels:
                raise ConfigError(f"data.mean and data.std: {len(cfg.mean)} values, but the inputs have {channels} "
                                  "channels")
            self.mean = torch.tensor(cfg.mean, dtype=dtype)
            self.std = torch.tensor(cfg.std, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)


__all__ = ["DataReadError", "data_dir", "subset", "Normalize"]

"""``data.name: arrays``: DIR/x.npy (N, ...) and DIR/y.npy (N,), memory-mapped; a batch reads only its rows.

Opening maps both files (``mmap_mode="r"``) to read their headers and reads the labels once to check them (N
integers; the inputs are not touched). ``fetch`` reads exactly the requested rows with ``pread`` (disk.FileRows:
nothing stays mapped, no read-ahead), so memory and start-up time do not grow with N. uint8 inputs are scaled to
[0, 1] as they are batched; other inputs are cast to train.dtype. The files are opened in each process that reads
(a loader worker after spawn), never pickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.schema import DataConfig
from ..errors import ConfigError
from .disk import DataReadError, FileRows, Normalize, data_dir, subset
from .source import Source


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"data.path: no {path.name} in {path.parent} (arrays needs x.npy and y.npy)") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.path: {path} is not a readable .npy array ({exc})") from None


class ArraySource(Source):
    def __init__(self, cfg: DataConfig, seed: int, dtype: torch.dtype, loss: str):
        directory = data_dir(cfg)
        self.x_path, self.y_path = directory / "x.npy", directory / "y.npy"
        x, y = _open(self.x_path), _open(self.y_path)
        if len(x) != len(y):
            raise ConfigError(f"data.path: x.npy has {len(x)} samples but y.npy has {len(y)}")
        if x.ndim < 2:
            raise ConfigError(f"data.path: x.npy has shape {x.shape}; expected (N, ...) with one row per sample")
        self.rows = subset(len(x), cfg, seed, f"{directory}")
        self._shape, self._x_dtype = tuple(x.shape[1:]), x.dtype
        self.dtype, self.loss = dtype, loss
        self.num_classes = self._check_targets(np.asarray(y), loss)
        self.normalize = Normalize(cfg, self._shape[0], dtype)
        self._x, self._y = FileRows(self.x_path, x), FileRows(self.y_path, y)

    def _check_targets(self, y: np.ndarray, loss: str) -> int:
        where = f"data.path: {self.y_path}"
        if loss == "mse":
            if not np.issubdtype(y.dtype, np.floating) or y.ndim > 2:
                raise ConfigError(f"{where} has dtype {y.dtype} and shape {y.shape}; train.loss=mse needs float "
                                  "targets of shape (N,) or (N, outputs)")
            return 1 if y.ndim == 1 else y.shape[1]
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise ConfigError(f"{where} has dtype {y.dtype} and shape {y.shape}; train.loss=cross_entropy needs "
                              "integer class labels of shape (N,)")
        if len(y) and y.min() < 0:
            raise ConfigError(f"{where} holds a negative label ({int(y.min())})")
        return int(y.max()) + 1 if len(y) else 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def bytes_read(self) -> int:
        """Bytes this process has read from the files so far (bench data reports them per sample)."""
        return self._x.bytes_read + self._y.bytes_read

    def fetch(self, indices: np.ndarray, keys: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[indices]
        try:
            x = self._x.rows(rows)  # in file order, then put back in batch order
            y = self._y.rows(rows)
        except OSError as exc:
            raise DataReadError(f"data.path: cannot read {self.x_path}: {exc}") from None
        inputs = torch.from_numpy(x)
        inputs = inputs.to(self.dtype).div_(255) if inputs.dtype == torch.uint8 else inputs.to(self.dtype)
        targets = torch.from_numpy(y)
        if self.loss == "mse":
            targets = targets.to(self.dtype).reshape(len(y), -1)
        else:
            targets = targets.long()
        return self.normalize(inputs), targets


def open_source(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype, loss: str) -> ArraySource:
    """The format's entry in formats.FORMATS."""
    return ArraySource(cfg, seed, dtype, loss)


__all__ = ["ArraySource", "open_source"]

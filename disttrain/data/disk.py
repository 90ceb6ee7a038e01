"""What the on-disk formats (arrays.py, imagefolder.py) share: the directory check, the seeded subset of
data.num_samples, per-channel normalisation, and the error of a sample that cannot be read."""

from __future__ import annotations

import os
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


class FileRows:
    """Reads rows of an on-disk array with ``os.pread``: exactly the bytes of the rows asked for, nothing mapped.

    A memory map would be simpler, but a fault on a mapped file reads ahead (8 MB on a disk that reads ahead that
    far) and maps the cached pages around it into the process, and every row a process has read stays mapped in it:
    a loader worker that draws random rows of a 0.9 GB file grew by hundreds of MB, in proportion to the file (on a
    network file system, that is read amplification too). A ``pread`` copies the row into the batch and maps nothing;
    ``POSIX_FADV_RANDOM`` turns the kernel's read-ahead off for the file. The descriptor is opened in each process
    on first use (a forked loader worker may share its rank's: ``pread`` has no file position), never pickled.

    ``array``: the file memory-mapped (``np.load(mmap_mode="r")`` or ``np.memmap``): its layout, not its pages.
    """

    def __init__(self, path: Path, array: np.ndarray):
        self.path = Path(path)
        self.offset = int(getattr(array, "offset", 0))  # the .npy header's length
        self.dtype, self.row_shape = array.dtype, tuple(array.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * array.dtype.itemsize
        self.contiguous = bool(array.flags.c_contiguous)  # Fortran order: rows are not contiguous in the file
        self.bytes_read = 0  # by this process: what bench data reports per sample
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        return self._fd

    def _read_into(self, buffer: np.ndarray, position: int) -> None:
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):  # a pread may return fewer bytes than asked (signals, network file systems)
            n = os.preadv(self._descriptor(), [view[done:]], position + done)
            if n == 0:
                raise OSError(f"the file ends at byte {position + done}, before the row")
            done += n
        self.bytes_read += done

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (in that order) as one array; read in file order, one ``pread`` per run of neighbours."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        if not self.contiguous:  # (rare) fall back to the map
            out[:] = np.load(self.path, mmap_mode="r", allow_pickle=False)[rows]
            return out
        order = np.argsort(rows, kind="stable")
        ordered = np.empty_like(out)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[order[j]] == rows[order[j - 1]] + 1:
                j += 1
            self._read_into(ordered[i:j], self.offset + int(rows[order[i]]) * self.row_bytes)
            i = j
        out[order] = ordered
        return out

    def span(self, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of a flat (one-dimensional) array."""
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        if len(out):
            self._read_into(out, self.offset + start * self.dtype.itemsize)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

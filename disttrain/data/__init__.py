"""Data: the global batch of every step, this rank's slice of it, and the datasets it is drawn from.

- batching.py: which samples step k's global batch holds, and which of them this rank holds (pure arithmetic);
- source.py: what a dataset must offer (read a batch by index); one module per format: builtin.py (synthetic,
  digits), users.py (a factory's tensors or map-style dataset), arrays.py (x.npy/y.npy, memory-mapped),
  imagefolder.py (class folders of images, decoded by Pillow); disk.py: what the on-disk formats share;
- augment.py: per-sample augmentation from the samples' keys;
- loader.py: this rank's micro-batches of every step, from any source, read in this process or by loader
  workers.
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..errors import ConfigError
from ..factory import is_import_path
from .augment import augment_images
from .batching import epoch_permutation, global_batch_indices, local_batch_size, local_slice
from .builtin import BUILTIN
from .loader import GlobalBatches
from .source import Dataset, Source
from .users import from_factory
from .arrays import ArraySource
from .imagefolder import ImageFolderSource


def build_dataset(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype,
                  loss: str = "cross_entropy") -> Source:
    """The dataset in the shape the model wants: built-in data as vectors for the mlp and (C, 8, 8) images
    for every other model; on-disk data and a data factory's (``data.name: module:function``) as they are,
    checked. On-disk data and a factory's map-style dataset are opened, not read: batches read their samples."""
    if is_import_path(cfg.name):
        source = from_factory(cfg, seed, dtype, loss)
    elif cfg.name == "arrays":
        source = ArraySource(cfg, seed, dtype, loss)
    elif cfg.name == "imagefolder":
        source = ImageFolderSource(cfg, seed, dtype)
    else:
        x, y, num_classes = BUILTIN[cfg.name](cfg, model_name != "mlp", seed)
        source = Dataset(torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long), num_classes)
    if cfg.augment != "none" and len(source.input_shape) != 3:
        raise ConfigError(f"data.augment={cfg.augment} needs images (N, C, H, W), but the inputs have shape "
                          f"{(len(source), *source.input_shape)}")
    source.augment, source.crop_padding = cfg.augment, cfg.crop_padding
    return source


__all__ = ["build_dataset", "Dataset", "Source", "GlobalBatches", "augment_images", "epoch_permutation",
           "global_batch_indices", "local_batch_size", "local_slice"]

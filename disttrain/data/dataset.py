"""A config's dataset: a data factory's by import path, or a format's from the table in formats.py."""


from __future__ import annotations

import importlib

import torch

from ..config.schema import DataConfig
from ..errors import ConfigError
from ..factory import is_import_path
from .formats import FORMATS
from .source import Source
from .users import from_factory


def build_dataset(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype,
                  loss: str = "cross_entropy") -> Source:
    """The dataset in the shape the model wants: built-in data as vectors for the mlp and (C, 8, 8) images
    for every other model; on-disk data and a data factory's (``data.name: module:function``) as they are,
    checked. On-disk data and a factory's map-style dataset are opened, not read: batches read their samples."""
    if is_import_path(cfg.name):
        source = from_factory(cfg, seed, dtype, loss)
    else:  # a name from the table (validate.py checked it)
        module = importlib.import_module(f"{__package__}.{FORMATS[cfg.name].module}")
        source = module.open_source(cfg, model_name, seed, dtype, loss)
    if cfg.augment != "none" and len(source.input_shape) != 3:
        raise ConfigError(f"data.augment={cfg.augment} needs images (N, C, H, W), but the inputs have shape "
                          f"{(len(source), *source.input_shape)}")
    source.augment, source.crop_padding = cfg.augment, cfg.crop_padding
    return source


__all__ = ["build_dataset"]

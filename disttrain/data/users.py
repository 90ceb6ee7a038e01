"""Users' data by import path (``data.name: package.module:function``): ``function(num_samples, seed, **kwargs)``
returns (x, y) tensors or arrays, or a map-style dataset of (x, y) pairs; what it returns is checked here, in one
line naming the factory."""

from __future__ import annotations

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError
from ..factory import call_factory


def from_factory(cfg: DataConfig, seed: int, dtype: torch.dtype, loss: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Call ``function(num_samples, seed, **kwargs)``; it returns (x, y) or a map-style dataset of (x, y)."""
    path = cfg.name
    out = call_factory("data.name", path, cfg.num_samples, seed, **cfg.kwargs)
    where = f"data.name: {path!r}"
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in out):
        x, y = (torch.as_tensor(t) for t in out)
    elif hasattr(out, "__len__") and hasattr(out, "__getitem__") and not isinstance(out, (str, bytes, dict)):
        x, y = _materialise(out, where)
    else:
        raise ConfigError(f"{where} returned {type(out).__name__}; expected (x, y) tensors or a map-style dataset "
                          "of (x, y) pairs")
    if x.dim() < 2 or len(x) != cfg.num_samples or len(y) != cfg.num_samples:
        raise ConfigError(f"{where} returned x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}; expected "
                          f"data.num_samples={cfg.num_samples} samples in both (x: (N, ...) with N = {cfg.num_samples})")
    if x.is_floating_point():
        x = x.to(dtype)  # integer inputs (token ids, say) are kept as they are
    if loss == "mse":
        if not y.is_floating_point() or y.dim() > 2:
            raise ConfigError(f"{where} returned y of dtype {y.dtype} and shape {tuple(y.shape)}; train.loss=mse "
                              "needs float targets of shape (N,) or (N, outputs)")
        y = y.to(dtype).reshape(len(y), -1)
        return x, y, y.shape[1]
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise ConfigError(f"{where} returned y of dtype {y.dtype} and shape {tuple(y.shape)}; "
                          "train.loss=cross_entropy needs integer class labels of shape (N,)")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= cfg.num_classes:
        raise ConfigError(f"{where} returned labels in [{low}, {high}]; data.num_classes={cfg.num_classes} allows "
                          f"0 to {cfg.num_classes - 1}")
    return x, y.long(), cfg.num_classes


def _materialise(dataset, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style dataset, read once into two tensors."""
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"{where} returned a dataset whose item {i} is {type(item).__name__}, not an (x, y) pair")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise ConfigError(f"{where} returned an empty dataset")
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as exc:
        raise ConfigError(f"{where} returned a dataset whose items differ in shape: "
                          f"{str(exc).strip().splitlines()[0]}") from None

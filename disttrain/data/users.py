"""Users' data by import path (``data.name: package.module:function``): ``function(num_samples, seed, **kwargs)``
returns (x, y) tensors or arrays, or a map-style dataset of (x, y) pairs or of dicts (``input_ids``, ``labels``,
optional ``attention_mask``: Hugging Face's items, a ``datasets.Dataset`` included; named.py collates them); what it
returns is checked here, in one line naming the factory."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..config.schema import TOKEN_LOSSES, DataConfig
from ..errors import ConfigError
from ..factory import call_factory
from ..randomness import SampleKeys
from .named import CollateError, NamedInputs, collate
from .source import Dataset, Source


def from_factory(cfg: DataConfig, seed: int, dtype: torch.dtype, loss: str) -> Source:
    """Call ``function(num_samples, seed, **kwargs)``: (x, y) tensors or arrays are held in memory; a map-style
    dataset of (x, y) pairs is read per batch (:class:`MapSource`), never materialised."""
    path = cfg.name
    out = call_factory("data.name", path, cfg.num_samples, seed, **cfg.kwargs)
    where = f"data.name: {path!r}"
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in out):
        x, y = (torch.as_tensor(t) for t in out)
        if x.dim() < 2 or len(x) != cfg.num_samples or len(y) != cfg.num_samples:
            raise ConfigError(f"{where} returned x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}; "
                              f"expected data.num_samples={cfg.num_samples} samples in both (x: (N, ...) with N = "
                              f"{cfg.num_samples})")
        x, y, num_classes = _checked(x, y, cfg, dtype, loss, where)
        return Dataset(x, y, num_classes)
    if hasattr(out, "__len__") and hasattr(out, "__getitem__") and not isinstance(out, (str, bytes, dict)):
        if len(out) != cfg.num_samples:
            raise ConfigError(f"{where} returned a dataset of {len(out)} samples; expected data.num_samples="
                              f"{cfg.num_samples}")
        return MapSource(out, cfg, dtype, loss, where)
    raise ConfigError(f"{where} returned {type(out).__name__}; expected (x, y) tensors or a map-style dataset "
                      "of (x, y) pairs or of dicts with 'input_ids' and 'labels'")


def _checked(x: torch.Tensor | NamedInputs, y: torch.Tensor, cfg: DataConfig, dtype: torch.dtype, loss: str,
             where: str) -> tuple[torch.Tensor | NamedInputs, torch.Tensor, int]:
    """(x, y) in the run's types, checked against train.loss and data.num_classes; the model's output width.
    Named inputs: ``input_ids`` is checked as x, ``attention_mask`` as 0s and 1s of its shape."""
    if isinstance(x, NamedInputs):
        mask = x.get("attention_mask")
        if mask is not None and (mask.shape != x.shape or not bool(((mask == 0) | (mask == 1)).all())):
            raise ConfigError(f"{where} returned an 'attention_mask' that is not 0s and 1s of the shape of 'input_ids'"
                              f" {tuple(x.shape)}")
        ids, y, width = _checked(x["input_ids"], y, cfg, dtype, loss, where)
        named = NamedInputs({**x, "input_ids": ids, **({} if mask is None else {"attention_mask": mask.long()})})
        return named, y, width
    if loss in TOKEN_LOSSES:
        return (*check_tokens(x, y, cfg.num_classes, where, loss), cfg.num_classes)
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


def check_tokens(x: torch.Tensor, y: torch.Tensor, vocab_size: int, where: str, loss: str = "token_cross_entropy"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``x`` and targets ``y``, both integer (N, T), as int64: every input in [0, V), every target in
    [0, V) or -100 (ignored). Each violation is a one-line ConfigError naming ``where``."""
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 2:
            raise ConfigError(f"{where} returned {name} of dtype {t.dtype} and shape {tuple(t.shape)}; "
                              f"train.loss={loss} needs integer token ids of shape (N, T)")
    if x.shape != y.shape:
        raise ConfigError(f"{where} returned x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}; "
                          f"train.loss={loss} needs one target per input token")
    bad_x = (x < 0) | (x >= vocab_size)
    if bad_x.any():
        raise ConfigError(f"{where} returned an input token {int(x[bad_x][0])} outside [0, {vocab_size}) (the "
                          f"vocabulary size V={vocab_size})")
    bad_y = ((y < 0) | (y >= vocab_size)) & (y != -100)
    if bad_y.any():
        raise ConfigError(f"{where} returned a target {int(y[bad_y][0])} outside [0, {vocab_size}); a target is a "
                          f"token id below the vocabulary size V={vocab_size}, or -100 (ignored)")
    return x.long(), y.long()


class MapSource(Source):
    """A map-style dataset (``__len__``, ``__getitem__(i) -> (x, y)`` or a dict: named.py), read a batch at a time.

    A dataset with ``getitem_keyed(i, keys)`` is called with each sample's keys instead (a SampleKeys of one
    sample: seed, step and its position in the global batch), so its own random transforms can draw from
    ``disttrain.randomness.uniform(keys, AUGMENT_STREAM, n, call=1)`` and be the same on any rank or worker.
    """

    def __init__(self, dataset, cfg: DataConfig, dtype: torch.dtype, loss: str, where: str):
        self.dataset, self.cfg, self.dtype, self.loss, self.where = dataset, cfg, dtype, loss, where
        self.keyed = callable(getattr(dataset, "getitem_keyed", None))
        if len(dataset) == 0:
            raise ConfigError(f"{where} returned an empty dataset")
        first, _ = self._read(np.arange(1), None)  # shapes and types, from one sample
        self._shape = tuple(first.shape[1:])
        self.num_classes = _checked(first, _, cfg, dtype, loss, where)[2]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    def _read(self, indices: np.ndarray, keys: SampleKeys | None) -> tuple[torch.Tensor | NamedInputs, torch.Tensor]:
        items = []
        for j, i in enumerate(indices.tolist()):
            if self.keyed and keys is not None:
                items.append(self.dataset.getitem_keyed(i, keys.select(slice(j, j + 1))))
            else:
                items.append(self.dataset[i])
        if isinstance(items[0], Mapping):
            try:
                return collate(items, indices.tolist())
            except CollateError as exc:
                raise ConfigError(f"{self.where} returned a dataset whose {exc}") from None
        xs, ys = [], []
        for i, item in zip(indices.tolist(), items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ConfigError(f"{self.where} returned a dataset whose item {i} is {type(item).__name__}, not an "
                                  "(x, y) pair or a dict")
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        try:
            return torch.stack(xs), torch.stack(ys)
        except RuntimeError as exc:
            raise ConfigError(f"{self.where} returned a dataset whose items differ in shape: "
                              f"{str(exc).strip().splitlines()[0]}") from None

    def fetch(self, indices: np.ndarray, keys: SampleKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._read(indices, keys)
        x, y, _ = _checked(x, y, self.cfg, self.dtype, self.loss, self.where)
        return x, y


__all__ = ["from_factory", "check_tokens", "MapSource"]

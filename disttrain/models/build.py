"""Small models with a norm slot, and users' models from an import path, initialised from the seed so every
rank builds the same weights.

A model from ``model.name: package.module:function`` is built as ``function(input_shape, num_classes,
**model.kwargs)`` under the same seeded RNG as the built-in ones, then adapted: its BatchNorm layers become
disttrain's SyncBatchNorm with ``model.norm: syncbn`` (``bn`` and ``none`` leave them as they are), and its
torch dropout layers become per-sample dropout (randomness.py), whose masks do not depend on the rank.

Its output is the logits, or anything carrying them as ``.logits`` or ``["logits"]`` (a transformers
``ModelOutput``: no wrapper needed, calling.py); on named inputs (a dataset of dicts, data/named.py) it
is called by name, ``model(input_ids=..., attention_mask=...)``.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..config.schema import TOKEN_LOSSES, ModelConfig
from ..data.named import NamedInputs
from ..errors import ConfigError
from ..factory import call_factory, is_import_path, one_line
from ..parallel.syncbn import convert_sync_batchnorm
from ..randomness import assign_streams, convert_dropout
from .calling import call_model, logits_of
from .registry import MODELS


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int,
                dtype: torch.dtype, device: torch.device, example: torch.Tensor | None = None,
                loss: str = "cross_entropy") -> nn.Module:
    """Build under a private RNG seeded with ``seed``: identical weights on every rank, every generator untouched.

    ``example``: a few inputs to check a factory model's output shape with (default: zeros of ``input_shape``);
    ``loss``: train.loss, which decides that shape ((N, num_classes), or (N, T, V) for token_cross_entropy).
    """
    # Models are built on the CPU and moved afterwards, so only the CPU generator is seeded, and fork_rng restores it.
    # (torch.manual_seed would also reseed every CUDA generator, which fork_rng(devices=[]) does not restore; forking
    # every CUDA device instead would create a context on each GPU in every rank.)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        if is_import_path(cfg.name):
            model = _from_factory(cfg, input_shape, num_classes, dtype, example, loss)
        else:  # a name from the table (validate.py checked it)
            model = importlib.import_module(f"{__package__}.{MODELS[cfg.name]}").build(cfg, input_shape, num_classes)
    return assign_streams(model).to(device=device, dtype=dtype)


def _from_factory(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, dtype: torch.dtype,
                  example: torch.Tensor | None, loss: str) -> nn.Module:
    path = cfg.name
    model = call_factory("model.name", path, input_shape, num_classes, **cfg.kwargs)
    if not isinstance(model, nn.Module):  # the factory's return value
        raise ConfigError(f"model.name: {path!r} returned {type(model).__name__}, expected a torch.nn.Module")
    model = model.to(dtype=dtype)
    # Before any conversion, in eval mode (no statistics updated, no collectives, dropout off): a forward on
    # two inputs, which also initialises lazy layers, here under the seeded RNG.
    x = example if example is not None else torch.zeros((2, *input_shape), dtype=dtype)
    tokens = loss in TOKEN_LOSSES  # logits per position: (N, T, V)
    expected = (len(x), x.shape[1], num_classes) if tokens and x.dim() == 2 else (len(x), num_classes)
    inputs = f"named inputs {', '.join(x.keys())} of shape" if isinstance(x, NamedInputs) else "inputs of shape"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, x)
    except Exception as exc:
        raise ConfigError(f"model.name: {path!r} failed on {inputs} {tuple(x.shape)}: {one_line(exc)}") from None
    model.train(was_training)
    try:
        out = logits_of(out)
    except TypeError as exc:
        raise ConfigError(f"model.name: {path!r} on {inputs} {tuple(x.shape)}: {exc}") from None
    if tuple(out.shape) != expected:
        raise ConfigError(f"model.name: {path!r} outputs shape {tuple(out.shape)} for {inputs} {tuple(x.shape)}; "
                          f"expected {expected} (" + (f"logits per token under train.loss={loss}, vocabulary "
                          f"{num_classes})" if tokens else f"one output per sample and class/target, num_classes="
                          f"{num_classes})"))
    if cfg.norm == "syncbn":
        model = convert_sync_batchnorm(model)
    return convert_dropout(model)


__all__ = ["build_model"]

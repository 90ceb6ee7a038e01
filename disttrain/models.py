"""Small models with a norm slot, and users' models from an import path, initialised from the seed so every
rank builds the same weights.

A model from ``model.name: package.module:function`` is built as ``function(input_shape, num_classes,
**model.kwargs)`` under the same seeded RNG as the built-in ones, then adapted: its BatchNorm layers become
disttrain's SyncBatchNorm with ``model.norm: syncbn`` (``bn`` and ``none`` leave them as they are), and its
torch dropout layers become per-sample dropout (randomness.py), whose masks do not depend on the rank.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .factory import call_factory, is_import_path, one_line
from .randomness import SampleDropout, assign_streams, convert_dropout
from .syncbn import SyncBatchNorm, convert_sync_batchnorm


def norm_layer(kind: str, num_features: int, dims: int) -> nn.Module:
    """The norm slot: nothing, per-rank BatchNorm, or SyncBatchNorm over the process group's global batch."""
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)
    if kind == "syncbn":
        return SyncBatchNorm(num_features)  # statistics over the default process group (plain BN without one)
    raise ValueError(f"unknown norm {kind!r}")


def dropout_layers(p: float) -> list[nn.Module]:
    """A per-sample dropout layer, or nothing for p = 0 (so the layer indices, and state_dict keys, stay)."""
    return [SampleDropout(p)] if p > 0 else []


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int, norm: str, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), norm_layer(norm, hidden, 1), nn.ReLU(), *dropout_layers(dropout),
            nn.Linear(hidden, hidden), norm_layer(norm, hidden, 1), nn.ReLU(), *dropout_layers(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    def __init__(self, in_channels: int, hidden: int, num_classes: int, norm: str, dropout: float = 0.0):
        super().__init__()
        mid = max(hidden // 2, 1)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1), norm_layer(norm, mid, 2), nn.ReLU(),
            nn.Conv2d(mid, hidden, 3, stride=2, padding=1), norm_layer(norm, hidden, 2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), *dropout_layers(dropout),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int,
                dtype: torch.dtype, device: torch.device, example: torch.Tensor | None = None) -> nn.Module:
    """Build under a private RNG seeded with ``seed``: identical weights on every rank, global RNG untouched.

    ``example``: a few inputs to check a factory model's output shape with (default: zeros of ``input_shape``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name == "mlp":
            in_features = 1
            for s in input_shape:
                in_features *= s
            model = MLP(in_features, cfg.hidden, num_classes, cfg.norm, cfg.dropout)
        elif cfg.name == "cnn":
            if len(input_shape) != 3:
                raise ConfigError(f"model.name=cnn needs (C, H, W) images, got inputs of shape {tuple(input_shape)}")
            model = CNN(input_shape[0], cfg.hidden, num_classes, cfg.norm, cfg.dropout)
        elif is_import_path(cfg.name):
            model = _from_factory(cfg, input_shape, num_classes, dtype, example)
        else:
            raise ValueError(f"unknown model {cfg.name!r}")
    return assign_streams(model).to(device=device, dtype=dtype)


def _from_factory(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, dtype: torch.dtype,
                  example: torch.Tensor | None) -> nn.Module:
    path = cfg.name
    model = call_factory("model.name", path, input_shape, num_classes, **cfg.kwargs)
    if not isinstance(model, nn.Module):  # the factory's return value
        raise ConfigError(f"model.name: {path!r} returned {type(model).__name__}, expected a torch.nn.Module")
    model = model.to(dtype=dtype)
    # Before any conversion, in eval mode (no statistics updated, no collectives, dropout off): a forward on
    # two inputs, which also initialises lazy layers, here under the seeded RNG.
    x = example if example is not None else torch.zeros((2, *input_shape), dtype=dtype)
    expected = (len(x), num_classes)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ConfigError(f"model.name: {path!r} failed on inputs of shape {tuple(x.shape)}: {one_line(exc)}") from None
    model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.name: {path!r} outputs {got} for inputs of shape {tuple(x.shape)}; expected "
                          f"{expected} (one output per sample and class/target, num_classes={num_classes})")
    if cfg.norm == "syncbn":
        model = convert_sync_batchnorm(model)
    return convert_dropout(model)

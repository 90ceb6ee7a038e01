"""Small models with a norm slot, initialised from the seed so every rank builds the same weights."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .syncbn import SyncBatchNorm


def norm_layer(kind: str, num_features: int, dims: int) -> nn.Module:
    """The norm slot: nothing, per-rank BatchNorm, or SyncBatchNorm over the process group's global batch."""
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)
    if kind == "syncbn":
        return SyncBatchNorm(num_features)  # statistics over the default process group (plain BN without one)
    raise ValueError(f"unknown norm {kind!r}")


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int, norm: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), norm_layer(norm, hidden, 1), nn.ReLU(),
            nn.Linear(hidden, hidden), norm_layer(norm, hidden, 1), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    def __init__(self, in_channels: int, hidden: int, num_classes: int, norm: str):
        super().__init__()
        mid = max(hidden // 2, 1)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1), norm_layer(norm, mid, 2), nn.ReLU(),
            nn.Conv2d(mid, hidden, 3, stride=2, padding=1), norm_layer(norm, hidden, 2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int,
                dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build under a private RNG seeded with ``seed``: identical weights on every rank, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name == "mlp":
            in_features = 1
            for s in input_shape:
                in_features *= s
            model = MLP(in_features, cfg.hidden, num_classes, cfg.norm)
        elif cfg.name == "cnn":
            if len(input_shape) != 3:
                raise ValueError(f"the cnn needs (C, H, W) inputs, got shape {input_shape}")
            model = CNN(input_shape[0], cfg.hidden, num_classes, cfg.norm)
        else:
            raise ValueError(f"unknown model {cfg.name!r}")
    return model.to(device=device, dtype=dtype)

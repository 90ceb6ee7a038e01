"""The built-in cnn: two convolutions with a norm slot, global average pooling, dropout and a linear head."""

from __future__ import annotations

import torch
from torch import nn

from ..config.schema import ModelConfig
from ..errors import ConfigError
from .layers import dropout_layers, norm_layer


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


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"model.name=cnn needs (C, H, W) images, got inputs of shape {tuple(input_shape)}")
    return CNN(input_shape[0], cfg.hidden, num_classes, cfg.norm, cfg.dropout)


__all__ = ["CNN", "build"]

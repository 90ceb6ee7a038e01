"""The built-in mlp: two hidden layers with a norm slot and dropout, on flattened inputs."""

from __future__ import annotations

import torch
from torch import nn

from ..config.schema import ModelConfig
from .layers import dropout_layers, norm_layer


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


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    in_features = 1
    for s in input_shape:
        in_features *= s
    return MLP(in_features, cfg.hidden, num_classes, cfg.norm, cfg.dropout)


__all__ = ["MLP", "build"]

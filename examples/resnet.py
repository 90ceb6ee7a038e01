"""A small ResNet (He et al. 2016): residual blocks with BatchNorm, for disttrain's "Bring your own model".

    model: {name: "examples.resnet:resnet", norm: syncbn, kwargs: {width: 8, blocks: [1, 1], dropout: 0.1}}

disttrain calls ``resnet(input_shape, num_classes, **kwargs)``. Nothing here knows about disttrain: the
BatchNorm2d layers become disttrain's SyncBatchNorm with ``model.norm: syncbn``, and the nn.Dropout before
the classifier becomes per-sample dropout, so the model trains the same on any number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: Sequence[int], dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers, channels = [], width
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            for i in range(count):
                layers.append(BasicBlock(channels, out, stride=2 if stage > 0 and i == 0 else 1))
                channels = out
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(self.dropout(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 16, blocks: Sequence[int] = (2, 2),
           dropout: float = 0.0) -> ResNet:
    """A ResNet for (C, H, W) images: a stem, ``len(blocks)`` stages (each halves the resolution after the
    first and doubles the width), global average pooling, dropout and a linear classifier."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet needs (C, H, W) images, got input shape {tuple(input_shape)}")
    return ResNet(input_shape[0], num_classes, width, blocks, dropout)

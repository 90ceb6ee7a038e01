"""A data factory for disttrain's "Bring your own model": small images of stripe patterns.

    data: {name: "examples.data:stripes", num_samples: 256, num_classes: 3, kwargs: {size: 8}}

disttrain calls ``stripes(num_samples, seed, **kwargs)`` and expects ``(x, y)``: x (N, C, H, W) float images,
y (N,) integer labels. A map-style dataset of (x, y) pairs would do too (it is read once).
"""

from __future__ import annotations

import math

import torch


def stripes(num_samples: int, seed: int, size: int = 8, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: horizontal stripes, 1: vertical stripes, 2: a checkerboard; random period, phase and contrast,
    plus Gaussian noise. Every class is unchanged by a horizontal flip or a small shift, so flip and crop
    augmentation keep the labels right."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (num_samples,), generator=g)
    period = torch.randint(2, 5, (num_samples, 1, 1), generator=g).double()
    phase = torch.rand(num_samples, 1, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    contrast = 0.5 + torch.rand(num_samples, 1, 1, generator=g, dtype=torch.float64)
    grid = torch.arange(size, dtype=torch.float64)
    rows = torch.sin(2 * math.pi * grid[None, :, None] / period + phase).expand(-1, size, size)
    cols = torch.sin(2 * math.pi * grid[None, None, :] / period + phase).expand(-1, size, size)
    pattern = torch.where((y == 0)[:, None, None], rows, torch.where((y == 1)[:, None, None], cols, rows * cols * 2))
    x = contrast * pattern + noise * torch.randn(num_samples, size, size, generator=g, dtype=torch.float64)
    return x[:, None].float(), y

"""Per-sample image augmentation drawn from the samples' keys (randomness.py): the same crop and flip for a
sample whichever rank, micro-batch or loader worker holds it."""

from __future__ import annotations

import torch

from ..randomness import AUGMENT_STREAM, SampleKeys, uniform


def augment_images(x: torch.Tensor, keys: SampleKeys, mode: str, padding: int) -> torch.Tensor:
    """Per-sample augmentation of images (N, C, H, W): ``crop`` (a random H x W window of the image zero-padded
    by ``padding`` on each side), ``flip`` (horizontal, with probability 1/2), ``flip_crop`` (crop, then flip).

    Sample i's flip and offsets are drawn from its own keys (three uniforms of the augmentation stream), so
    they are the same whichever rank or micro-batch holds it.
    """
    if mode == "none":
        return x
    u = uniform(keys, AUGMENT_STREAM, 3, x.device)
    n, c, h, w = x.shape
    pad = padding if mode in ("crop", "flip_crop") else 0
    source = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    # Offsets uniform in {0, ..., 2 * pad}: the corner of a window of the original size.
    top = (u[:, 1] * (2 * pad + 1)).long()[:, None]
    left = (u[:, 2] * (2 * pad + 1)).long()[:, None]
    rows = top + torch.arange(h, device=x.device)  # (n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if mode in ("flip", "flip_crop"):
        cols = torch.where(u[:, :1] < 0.5, (w - 1) - cols, cols)  # a flipped window reads its columns backwards
    cols = left + cols  # (n, w)
    # Crop and flip are one gather from each padded image, the same for every channel.
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return source.reshape(n, c, -1).gather(2, index).reshape(n, c, h, w)


__all__ = ["augment_images"]

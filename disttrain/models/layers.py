"""The built-in models' slots: the norm layer (none, per-rank BatchNorm, SyncBatchNorm) and per-sample dropout."""

from __future__ import annotations

from torch import nn

from ..parallel.syncbn import SyncBatchNorm
from ..randomness import SampleDropout


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


__all__ = ["norm_layer", "dropout_layers"]

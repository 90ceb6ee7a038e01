"""Gradient clipping on the global gradient.

Clipping runs after the gradients are reduced. At that point every rank holds the same gradient (the
count-weighted mean, see parallel/sync.py), so the local norm *is* the global-gradient norm, a local
clip_grad_norm_ equals the single-device clip, and every rank takes the same skip/step decision, with no
extra collective. Clipping each rank's gradient before the reduction (``clip.before_average``, for
demonstration only) rescales each g_r by its own factor min(1, c/||g_r||): the average of those is not the
clipped average, and the run no longer matches one device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config.schema import ClipConfig
from ..errors import RunFailure


class NonFiniteGradient(RunFailure):
    """The global gradient norm is inf or nan and ``clip.nonfinite`` is ``error``."""


def gradient_norm(params: Iterable[nn.Parameter], norm_type: float) -> torch.Tensor:
    """The norm of all gradients together, as one vector (a 0-dim tensor; inf/nan if non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)


def clip_gradients(params: Iterable[nn.Parameter], cfg: ClipConfig, norm: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Clip per ``cfg.mode``; return the gradient norm *before* clipping (inf/nan if non-finite), a 0-dim tensor
    on the gradients' device: reading it is a host sync, which the step makes once for everything it reads
    (run/step.py), not here.

    ``norm``: the global norm when the caller computed it (sharded gradients need a collective for it)."""
    params = [p for p in params if p.grad is not None]
    norm = gradient_norm(params, cfg.norm_type) if norm is None else norm
    if cfg.mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(params, cfg.max_norm, norm)
    elif cfg.mode == "value":
        torch.nn.utils.clip_grad_value_(params, cfg.value)
    return norm


def should_step(grad_norm: float, cfg: ClipConfig, step: int) -> bool:
    """False when the step is to be skipped (non-finite norm, ``nonfinite: skip``); raises under ``error``."""
    if math.isfinite(grad_norm):
        return True
    if cfg.nonfinite == "error":
        raise NonFiniteGradient(f"step {step}: the global gradient norm is {grad_norm} (clip.nonfinite=error)")
    return False

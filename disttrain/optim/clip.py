"""Gradient clipping on the global gradient.

Clipping runs after the gradients are reduced. At that point every rank holds the same gradient (the
count-weighted mean, see parallel/sync.py), so the local norm *is* the global-gradient norm, a local
clip_grad_norm_ equals the single-device clip, and every rank takes the same skip/step decision, with no
extra collective. Sharded gradients (fsdp: DTensors, 1/W of each gradient per rank) are the exception: each rank's
norm covers its shards only, and one all_reduce combines the parts into the global norm. Clipping each rank's gradient before the reduction (``clip.before_average``, for
demonstration only) rescales each g_r by its own factor min(1, c/||g_r||): the average of those is not the
clipped average, and the run no longer matches one device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config.schema import ClipConfig
from ..errors import RunFailure


class NonFiniteGradient(RunFailure):
    """The global gradient norm is inf or nan and ``clip.nonfinite`` is ``error``."""


def gradient_norm(params: Iterable[nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients together, as one vector (a 0-dim tensor; inf/nan if non-finite).

    Sharded gradients (FSDP2's DTensors) give a partial norm; ``full_tensor()`` all-reduces the ranks' parts
    (sums of |g|^p, or the max for the inf-norm): one collective, and every rank gets the same global norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_grad_norm_(parameters: nn.Module | Iterable[nn.Parameter] | torch.Tensor, max_norm: float,
                    norm_type: float = 2.0, *, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients by their global norm, after the reduction; return that norm (before clipping) as a
    tensor, without a host sync.

    ``parameters``: a model (plain, DistributedDataParallel, or fully_shard'ed) or its parameters. Replicated
    gradients (one process, DDP after backward) are the global gradient on every rank: no collective. Sharded
    ones (fsdp) need one all_reduce for the norm; each rank then scales its own shards by the same factor.
    """
    if max_norm <= 0 or norm_type <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm and norm_type must be > 0, got {max_norm} and {norm_type}")
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    norm = gradient_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"clip_grad_norm_: the global gradient norm is {float(norm)} (error_if_nonfinite=True)")
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def clip_gradients(params: Iterable[nn.Parameter], cfg: ClipConfig) -> torch.Tensor:
    """Clip the reduced gradient per ``cfg.mode``; return the global gradient norm *before* clipping (inf/nan if
    non-finite), a 0-dim tensor on the gradients' device: reading it is a host sync, which the step makes once for
    everything it reads (run/step.py), not here. ``norm`` is the public :func:`clip_grad_norm_`."""
    params = [p for p in params if p.grad is not None]
    if cfg.mode == "norm":
        return clip_grad_norm_(params, cfg.max_norm, cfg.norm_type)
    norm = gradient_norm(params, cfg.norm_type)
    if cfg.mode == "value":
        torch.nn.utils.clip_grad_value_(params, cfg.value)
    return norm


def should_step(grad_norm: float, cfg: ClipConfig, step: int) -> bool:
    """False when the step is to be skipped (non-finite norm, ``nonfinite: skip``); raises under ``error``."""
    if math.isfinite(grad_norm):
        return True
    if cfg.nonfinite == "error":
        raise NonFiniteGradient(f"step {step}: the global gradient norm is {grad_norm} (clip.nonfinite=error)")
    return False


__all__ = ["NonFiniteGradient", "gradient_norm", "clip_grad_norm_", "clip_gradients", "should_step"]

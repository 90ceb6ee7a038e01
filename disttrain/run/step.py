"""The step function: one optimizer step on this rank's slice of the global batch, in a fixed order.

forward/backward per micro-batch (no communication until the last; under autocast for bf16/fp16, the loss scaled
for fp16) -> reduce gradients over ranks (the strategy, parallel/sync.py) -> unscale (fp16) -> clip the global gradient ->
optimizer step (skipped on every rank if the gradient is not finite) -> update the loss scale (fp16). The strategy
decides how gradients travel; this order never changes. Mixed precision: precision.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..optim.clip import should_step
from ..parallel.sync import GradSync
from ..config.schema import ClipConfig
from ..models.calling import call_model
from .loss import LossDivisor, summed_loss
from .precision import LossScaler, autocast
from ..randomness import sample_keys


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's sum of per-sample losses (detached)
    grad_norm: float  # global gradient norm before clipping
    stepped: bool  # False: non-finite gradient, optimizer step skipped on every rank
    loss_scale: float = 1.0  # the fp16 loss scale this step's backward used (1 without loss scaling)
    count: torch.Tensor | None = None  # token losses: this rank's number of targets (a device tensor)
    control: list[float] | None = None  # the step's reduced control values (GradSync.control), read back with the norm


def train_step(sync: GradSync, optimizer: torch.optim.Optimizer, micro_batches: list[tuple],
               clip: ClipConfig, step: int, loss: str = "cross_entropy", precision: str = "fp32",
               scaler: LossScaler | None = None, token_weighting: str = "tokens") -> StepResult:
    """One optimizer step. A micro-batch is (x, y), or (x, y, keys) with the samples' keys for per-sample
    randomness (randomness.py). ``precision``: autocast of forward and loss; ``scaler``: fp16 loss scaling (its
    state moves on here, identically on every rank)."""
    scaler = scaler if scaler is not None else LossScaler(enabled=False)
    scale = scaler.scale
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=micro_batches[0][1].device)
    divisor = LossDivisor(loss, sync, micro_batches, token_weighting)  # tokens: their global count, summed during the first forward
    for j, (x, y, *keys) in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        # DDP would all-reduce at the end of every backward; no_sync keeps the first k-1 local.
        with contextlib.nullcontext() if last else sync.no_sync():
            with autocast(precision, x.device.type):
                with sample_keys(keys[0]) if keys else contextlib.nullcontext():
                    output = call_model(sync.module, x)  # by name for named inputs (models/calling.py)
                micro_loss = summed_loss(loss, output, y, token_weighting)
            # Summed loss over the step's count (the global batch size B, or its target tokens: loss.py), not a
            # per-micro-batch mean divided by k: exact for micro-batches and rank slices of any size. Why before
            # backward rather than in the reduction: see parallel/sync.py. fp16: times the loss scale.
            scaler.scale_loss(micro_loss / divisor.value(j)).backward()
        loss_sum += micro_loss.detach().double()
    overflow = None
    if clip.before_average:  # demonstration of the wrong order: clip each rank's local gradient, then reduce
        scaler.unscale_(sync.model.parameters())
        sync.clip_local(clip)
        sync.sync()
        grad_norm = sync.gradient_norm(clip.norm_type)
    else:
        sync.sync()
        # fp16: the overflow test and the unscaling see the reduced gradient, the same on every rank (exact, and
        # every rank decides alike with no collective: precision.py).
        overflow = scaler.overflows(sync.model)
        scaler.unscale_(sync.model.parameters())
        grad_norm = sync.clip(clip)
    grad_norm, overflow, control = read_back(grad_norm, overflow,
                                             None if sync.control is None else sync.reduced_control)
    stepped = not overflow and should_step(grad_norm, clip, step)
    if stepped:
        optimizer.step()
    scaler.update(not overflow and math.isfinite(grad_norm))  # the same decision everywhere: the same scale
    return StepResult(loss_sum, grad_norm, stepped, scale, divisor.local_count, control)


def read_back(norm: torch.Tensor, overflow: torch.Tensor | None, control: torch.Tensor | None
              ) -> tuple[float, bool, list[float] | None]:
    """The step's one host sync: the gradient norm, fp16's overflow flag and the reduced control values (a stop
    request, run/stop.py) are what the host decides on, so they come back together in one read. Each read on its
    own would stall a GPU's stream once more; the loss sums stay on the device until metrics flush."""
    parts = [norm.reshape(1).double()]
    if overflow is not None:
        parts.append(overflow.reshape(1).to(device=norm.device, dtype=torch.float64))
    if control is not None:  # copied to the norm's device, never to the host on its own
        parts.append(control.reshape(-1).to(device=norm.device, dtype=torch.float64))
    values = torch.cat(parts).tolist()
    flag = overflow is not None and values[1] > 0
    return values[0], flag, None if control is None else values[len(values) - control.numel():]


__all__ = ["summed_loss", "StepResult", "train_step", "read_back"]

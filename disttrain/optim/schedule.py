"""Learning-rate schedules: a pure function of the optimizer step.

With s the 0-based optimizer step, W = warmup_steps, T = total steps, f0 = warmup_start_factor, and eta the
base learning rate (optim.lr, or optim.lr * B / reference_batch_size under the linear scaling rule):

    warmup, s < W:   linear       eta * (f0 + (1 - f0) * s / W)
                     constant     eta * f0
                     exponential  eta * f0 ** (1 - s / W)
                     none         no warmup phase (W treated as 0)
    then, with p = min(1, (s - W) / max(1, T - W)):
                     cosine       min_lr + (eta - min_lr) * (1 + cos(pi * p)) / 2
                     linear       min_lr + (eta - min_lr) * (1 - p)
                     poly         min_lr + (eta - min_lr) * (1 - p) ** power
                     step         eta * gamma ** (number of milestones <= s)
                     constant     eta

Step 0 has lr eta * f0 > 0: warmup starts low, never at zero. One optimizer step is one schedule step,
whatever the world size and the number of accumulated micro-batches, and every rank computes the same value
from the same step, so nothing about the schedule is communicated.
"""

from __future__ import annotations

import bisect
import math

import torch

from ..config.schema import ScheduleConfig


def base_lr(lr: float, global_batch_size: int, cfg: ScheduleConfig) -> float:
    """eta: optim.lr, scaled by B / reference_batch_size when the linear scaling rule is on."""
    return lr * global_batch_size / cfg.reference_batch_size if cfg.scale_lr else lr


def lr_at(step: int, eta: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    warmup = 0 if cfg.warmup == "none" else cfg.warmup_steps
    if step < warmup:
        f0, frac = cfg.warmup_start_factor, step / warmup
        if cfg.warmup == "linear":
            return eta * (f0 + (1.0 - f0) * frac)
        if cfg.warmup == "constant":
            return eta * f0
        return eta * f0 ** (1.0 - frac)  # exponential
    p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    span = eta - cfg.min_lr
    if cfg.decay == "cosine":
        return cfg.min_lr + span * (1.0 + math.cos(math.pi * p)) / 2.0
    if cfg.decay == "linear":
        return cfg.min_lr + span * (1.0 - p)
    if cfg.decay == "poly":
        return cfg.min_lr + span * (1.0 - p) ** cfg.power
    if cfg.decay == "step":
        return eta * cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step)
    return eta  # constant


def build_scheduler(optimizer: torch.optim.Optimizer, eta: float, total_steps: int,
                    cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose lr at step s is ``lr_at(s)``; for training loops of one's own.

    Sets every param group's base lr to ``eta``; call ``scheduler.step()`` once after each
    ``optimizer.step()``. Its state_dict holds the step count, so a resumed run continues the same sequence.
    """
    for group in optimizer.param_groups:
        group["lr"] = eta
        group["initial_lr"] = eta

    # A plain closure, not a callable object: LambdaLR stores an object's __dict__ in its state_dict,
    # whereas the state of a closure-based schedule is just the step count (loadable with weights_only).
    def factor(step: int) -> float:
        return lr_at(step, eta, total_steps, cfg) / eta

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

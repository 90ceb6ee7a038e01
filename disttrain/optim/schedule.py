"""Learning-rate schedules: a pure function of the optimizer step.

With s the 0-based optimizer step, W = warmup_steps, T = total_steps, f0 = warmup_start_factor, and eta the
base learning rate (the optimizer's lr; in the trainer optim.lr, or optim.lr * B / reference_batch_size under
the linear scaling rule):

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

:func:`lr_at` and :func:`warmup_schedule` are the public functions (plain, validated arguments); the trainer's
``schedule:`` section reaches the same functions through :func:`schedule_args`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..config.schema import ScheduleConfig

WARMUPS = ("none", "linear", "constant", "exponential")
DECAYS = ("constant", "cosine", "linear", "poly", "step")


def check_schedule(*, base_lr: float | None, warmup_steps: int, total_steps: int, decay: str = "cosine",
                   warmup: str = "linear", warmup_start_factor: float = 0.1, min_lr: float = 0.0,
                   power: float = 1.0, milestones: Sequence[int] = (), gamma: float = 0.1) -> None:
    """Raise ValueError (one line naming the argument) unless the arguments describe a schedule.

    ``base_lr`` None: not known yet (a scheduler checks it against each param group's lr)."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)
    require(warmup in WARMUPS, f"warmup: must be one of {', '.join(WARMUPS)}, got {warmup!r}")
    require(decay in DECAYS, f"decay: must be one of {', '.join(DECAYS)}, got {decay!r}")
    require(total_steps >= 1, f"total_steps: must be >= 1, got {total_steps}")
    require(warmup_steps >= 0, f"warmup_steps: must be >= 0, got {warmup_steps}")
    require(warmup == "none" or warmup_steps <= total_steps,
            f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")
    require(0 < warmup_start_factor <= 1, f"warmup_start_factor: must be in (0, 1], got {warmup_start_factor}")
    require(power > 0, f"power: must be > 0, got {power}")
    require(gamma > 0, f"gamma: must be > 0, got {gamma}")
    require(all(m >= 1 for m in milestones) and list(milestones) == sorted(set(milestones)),
            f"milestones: must be increasing steps >= 1, got {list(milestones)}")
    require(min_lr >= 0, f"min_lr: must be >= 0, got {min_lr}")
    if base_lr is not None:
        require(base_lr >= 0, f"base_lr: must be >= 0, got {base_lr}")
        require(min_lr <= base_lr, f"min_lr: must be in [0, base lr={base_lr:g}], got {min_lr}")


def _lr(step: int, eta: float, warmup_steps: int, total_steps: int, decay: str, warmup: str,
        warmup_start_factor: float, min_lr: float, power: float, milestones: Sequence[int], gamma: float) -> float:
    """The formulas of the module docstring, for arguments already checked."""
    warmup_steps = 0 if warmup == "none" else warmup_steps
    if step < warmup_steps:
        f0, frac = warmup_start_factor, step / warmup_steps
        if warmup == "linear":
            return eta * (f0 + (1.0 - f0) * frac)
        if warmup == "constant":
            return eta * f0
        return eta * f0 ** (1.0 - frac)  # exponential
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    span = eta - min_lr
    if decay == "cosine":
        return min_lr + span * (1.0 + math.cos(math.pi * p)) / 2.0
    if decay == "linear":
        return min_lr + span * (1.0 - p)
    if decay == "poly":
        return min_lr + span * (1.0 - p) ** power
    if decay == "step":
        return eta * gamma ** bisect.bisect_right(milestones, step)
    return eta  # constant


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, decay: str = "cosine",
          warmup: str = "linear", warmup_start_factor: float = 0.1, min_lr: float = 0.0, power: float = 1.0,
          milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warmup to ``base_lr``, then ``decay`` to ``min_lr``
    at ``total_steps`` (formulas: the module docstring). Raises ValueError for arguments that describe no schedule."""
    args = dict(warmup_steps=warmup_steps, total_steps=total_steps, decay=decay, warmup=warmup,
                warmup_start_factor=warmup_start_factor, min_lr=min_lr, power=power, milestones=milestones,
                gamma=gamma)
    check_schedule(base_lr=base_lr, **args)
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    return _lr(step, base_lr, **args)


def warmup_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    decay: str = "cosine", warmup: str = "linear", warmup_start_factor: float = 0.1,
                    min_lr: float = 0.0, power: float = 1.0, milestones: Sequence[int] = (),
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch LRScheduler whose lr at step s is :func:`lr_at` (s) with base_lr = each param group's lr.

    Call ``scheduler.step()`` once after each ``optimizer.step()`` (once per optimizer step: not per micro-batch,
    not per process). Its state_dict holds the step count only, so a resumed run continues the same sequence.
    """
    args = dict(warmup_steps=warmup_steps, total_steps=total_steps, decay=decay, warmup=warmup,
                warmup_start_factor=warmup_start_factor, min_lr=min_lr, power=power, milestones=list(milestones),
                gamma=gamma)
    etas = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    for eta in etas:
        check_schedule(base_lr=float(eta), **args)

    # Plain closures, not callable objects: LambdaLR stores an object's __dict__ in its state_dict, whereas the
    # state of a closure-based schedule is just the step count (loadable with weights_only).
    def factor_of(eta: float):
        def factor(step: int) -> float:
            return _lr(step, eta, **args) / eta if eta else 0.0
        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_of(float(eta)) for eta in etas])


def base_lr(lr: float, global_batch_size: int, cfg: ScheduleConfig) -> float:
    """eta: optim.lr, scaled by B / reference_batch_size when the linear scaling rule is on."""
    return lr * global_batch_size / cfg.reference_batch_size if cfg.scale_lr else lr


def schedule_args(cfg: ScheduleConfig) -> dict[str, Any]:
    """The ``schedule:`` section as the keyword arguments of :func:`lr_at` and :func:`warmup_schedule`."""
    return dict(warmup=cfg.warmup, warmup_steps=cfg.warmup_steps, warmup_start_factor=cfg.warmup_start_factor,
                decay=cfg.decay, min_lr=cfg.min_lr, power=cfg.power, milestones=list(cfg.milestones),
                gamma=cfg.gamma)


def build_scheduler(optimizer: torch.optim.Optimizer, eta: float, total_steps: int,
                    cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The trainer's scheduler: every param group's base lr set to ``eta``, then :func:`warmup_schedule`."""
    for group in optimizer.param_groups:
        group["lr"] = eta
        group["initial_lr"] = eta
    return warmup_schedule(optimizer, total_steps=total_steps, **schedule_args(cfg))


__all__ = ["lr_at", "warmup_schedule", "check_schedule", "schedule_args", "base_lr", "build_scheduler",
           "WARMUPS", "DECAYS"]

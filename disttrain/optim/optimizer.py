"""One builder for a run's parts: the data, the model inside its gradient strategy, the optimizer, the schedule.

Everything that trains or inspects a model builds it here (train, verify and step-wise verify through the
trainer, the benchmarks, the demos, the checks before workers start), so they all see the same data and the same
initial weights for a config. Data flow: config -> data source (data/) -> model (models.py, shapes from the
data) -> gradient strategy (comm.py) -> optimizer -> schedule (schedule.py).
"""

from __future__ import annotations


import torch

from ..config.schema import OptimConfig



def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)

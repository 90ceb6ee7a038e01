"""The step function and the training loop.

Data flow: config -> process group (dist.py) -> this rank's slice of the global batch (data.py) -> model
(models.py) -> step: forward/backward, gradient reduction (comm.py), optimizer step -> metrics
reduced over ranks (metrics.py) -> final checkpoint on rank 0 (checkpoint.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import save_final
from .comm import GradSync, build_grad_sync, unwrap
from .config import Config, OptimConfig, check_world_size
from .data import GlobalBatches, build_dataset
from .dist import DistEnv
from .metrics import MetricsLogger, all_reduce_sum
from .models import build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def train_step(sync: GradSync, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on this rank's slice; returns the local *sum* of per-sample losses (detached).

    Order: forward/backward -> reduce gradients over ranks -> optimizer step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = F.cross_entropy(sync.module(x), y, reduction="sum")
    # Backpropagate the local mean: the gradient a single process computes on its slice. The count
    # weight b_r/B that turns the W local means into the global mean is applied while gradients are
    # communicated (inside DDP's backward, or in sync() for the explicit path): see comm.py.
    (loss_sum / y.shape[0]).backward()
    sync.sync()
    optimizer.step()
    return loss_sum.detach()


@dataclass
class TrainResult:
    model: nn.Module  # the unwrapped model after the last step
    losses: list[float] = field(default_factory=list)  # global mean loss per step


def run(cfg: Config, env: DistEnv, console: bool = True) -> TrainResult:
    """Train per ``cfg`` on this rank; every rank returns the same model and losses.

    ``console``: rank 0 prints a line every ``train.log_every`` steps (metrics.jsonl gets every step anyway).
    """
    check_world_size(cfg, env.world_size)
    t = cfg.train
    out_dir = Path(t.out_dir)
    dtype = DTYPES[t.dtype]
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())  # the resolved config of this run

    dataset = build_dataset(cfg.data, cfg.model.name, cfg.seed, dtype)
    batches = GlobalBatches(dataset, t.global_batch_size, cfg.seed, env.rank, env.world_size)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed, dtype, env.device)
    sync = build_grad_sync(model, cfg.comm, env, batches.local_batch_size, t.global_batch_size)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    logger = MetricsLogger(out_dir, env, t.log_every, t.steps, console=console)

    result = TrainResult(model=model)
    sync.module.train()
    for step in range(t.steps):
        start = time.perf_counter()
        x, y = batches.batch(step, env.device)
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = train_step(sync, optimizer, x, y)
        # One packed all_reduce: the global mean loss is (sum of per-sample losses) / (sum of counts).
        total_loss, samples = all_reduce_sum([loss_sum, float(y.shape[0])], env)
        result.losses.append(total_loss / samples)
        logger.log({"step": step, "loss": total_loss / samples, "samples": int(samples), "lr": lr,
                    "ms": round(1000 * (time.perf_counter() - start), 3)})

    model = unwrap(sync.module)
    if env.is_main:
        save_final(out_dir / "final.pt", model, t.steps, cfg.to_dict(), env.world_size)
    result.model = model
    return result

"""The step function and the training loop.

Data flow: config -> process group (dist.py) -> this rank's slice of the global batch (data.py) -> model
(models.py) -> step: forward/backward per micro-batch, gradient reduction (comm.py), clipping of the global
gradient (clip.py), optimizer step, next lr (schedule.py) -> metrics reduced over ranks (metrics.py) -> final
checkpoint on rank 0 (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import save_final
from .clip import clip_gradients, gradient_norm, should_step
from .comm import GradSync, build_grad_sync, unwrap
from .config import ClipConfig, Config, OptimConfig, check_world_size
from .data import GlobalBatches, build_dataset
from .dist import DistEnv
from .metrics import MetricsLogger, all_reduce_sum
from .models import build_model
from .randomness import sample_keys
from .schedule import base_lr, build_scheduler

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def summed_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over the batch of per-sample losses (a sample is a row of ``target``).

    mse: a sample's loss is the mean squared error over its outputs, so the logged global mean loss
    (sum over samples / samples) is torch's ``mse_loss`` on the global batch.
    """
    if kind == "mse":
        return F.mse_loss(output, target, reduction="sum") / target.shape[1:].numel()
    return F.cross_entropy(output, target, reduction="sum")


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's sum of per-sample losses (detached)
    grad_norm: float  # global gradient norm before clipping
    stepped: bool  # False: non-finite gradient, optimizer step skipped on every rank


def train_step(sync: GradSync, optimizer: torch.optim.Optimizer, micro_batches: list[tuple],
               clip: ClipConfig, step: int, loss: str = "cross_entropy") -> StepResult:
    """One optimizer step on this rank's slice, in a fixed order:

    forward/backward per micro-batch (no communication until the last) -> reduce gradients over ranks ->
    clip the global gradient -> optimizer step (skipped on every rank if the gradient is not finite).
    A micro-batch is (x, y), or (x, y, keys) with the samples' keys for per-sample randomness (randomness.py).
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=micro_batches[0][1].device)
    for j, (x, y, *keys) in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        # DDP would all-reduce at the end of every backward; no_sync keeps the first k-1 local.
        with contextlib.nullcontext() if last else sync.no_sync():
            with sample_keys(keys[0]) if keys else contextlib.nullcontext():
                output = sync.module(x)
            micro_loss = summed_loss(loss, output, y)
            # Summed loss over a fixed divisor (the global batch size B for the mean), not a per-micro-batch
            # mean divided by k: exact for micro-batches and rank slices of any size. Why B, and why before
            # backward rather than in the reduction: see comm.py.
            (micro_loss / sync.loss_divisor).backward()
        loss_sum += micro_loss.detach().double()
    params = list(unwrap(sync.module).parameters())
    if clip.before_average:  # demonstration of the wrong order: clip each rank's local gradient, then reduce
        clip_gradients(params, clip)
        sync.sync()
        grad_norm = float(gradient_norm(params, clip.norm_type))
    else:
        sync.sync()
        # After the reduction every rank holds the same gradient: this local norm is the global one.
        grad_norm = clip_gradients(params, clip)
    stepped = should_step(grad_norm, clip, step)
    if stepped:
        optimizer.step()
    return StepResult(loss_sum, grad_norm, stepped)


@dataclass
class TrainResult:
    model: nn.Module  # the unwrapped model after the last step
    losses: list[float] = field(default_factory=list)  # global mean loss per step
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global gradient norm per step
    skipped_steps: int = 0


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

    dataset = build_dataset(cfg.data, cfg.model.name, cfg.seed, dtype, loss=t.loss)
    batches = GlobalBatches(dataset, t.global_batch_size, cfg.seed, env.rank, env.world_size)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed, dtype, env.device,
                        example=dataset.x[:2])
    sync = build_grad_sync(model, cfg.comm, env, batches.local_batch_size, t.global_batch_size)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, base_lr(cfg.optim.lr, t.global_batch_size, cfg.schedule), t.steps,
                                cfg.schedule)
    logger = MetricsLogger(out_dir, env, t.log_every, t.steps, console=console)

    result = TrainResult(model=model)
    sync.module.train()
    for step in range(t.steps):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        out = train_step(sync, optimizer, batches.keyed_micro_batches(step, env.device, t.accumulation_steps),
                         cfg.clip, step, loss=t.loss)
        scheduler.step()  # one schedule step per optimizer step (also when a non-finite step was skipped)
        # One packed all_reduce: the global mean loss is (sum of per-sample losses) / (sum of counts).
        total_loss, samples = all_reduce_sum([out.loss_sum, float(batches.local_batch_size)], env)
        result.losses.append(total_loss / samples)
        result.grad_norms.append(out.grad_norm)
        result.skipped_steps += not out.stepped
        logger.log({"step": step, "loss": total_loss / samples, "samples": int(samples), "lr": lr,
                    "grad_norm": out.grad_norm, "skipped": result.skipped_steps,
                    "ms": round(1000 * (time.perf_counter() - start), 3)})

    model = unwrap(sync.module)
    if env.is_main:
        save_final(out_dir / "final.pt", model, t.steps, cfg.to_dict(), env.world_size)
    result.model = model
    return result

"""The step function and the training loop.

Data flow: config -> process group (dist.py) -> this rank's slice of the global batch (data.py) -> model
(models.py) -> step: forward/backward per micro-batch, gradient reduction (comm.py), clipping of the global
gradient (clip.py), optimizer step, next lr (schedule.py) -> metrics reduced over ranks (metrics.py) -> final
checkpoint on rank 0 (checkpoint.py). A run may start from a checkpoint (resume, elastic restart, another world
size): the trajectory after step s depends only on the state at s and the config, never on the world size.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (CheckpointError, CheckpointWriter, checkpoint_dir, clear_checkpoints, load_checkpoint,
                         newest_readable, save_final, training_state)
from .clip import clip_gradients, gradient_norm, should_step
from .comm import GradSync, build_grad_sync, unwrap
from .config import ClipConfig, Config, ConfigError, OptimConfig, check_world_size, trajectory_differences
from .data import GlobalBatches, build_dataset
from .dist import DistEnv, broadcast_from_main, restart_count
from .metrics import MetricsLogger, StepMetrics
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
    losses: list[float] = field(default_factory=list)  # global mean loss per step run by this call
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global gradient norm per step
    skipped_steps: int = 0  # over the whole run, resumed runs included
    start_step: int = 0  # the step this call started from (> 0 when resumed from a checkpoint)
    optimizer: torch.optim.Optimizer | None = None


def _schedule_uses_total_steps(cfg: Config) -> bool:
    return cfg.schedule.decay in ("cosine", "linear", "poly")


def resume_state(cfg: Config, env: DistEnv, resume: bool | str | Path, allow: frozenset[str] = frozenset()
                 ) -> dict | None:
    """The checkpoint this run continues from, the same on every rank; None for a fresh start.

    ``resume``: True for the newest readable checkpoint in train.out_dir, a path for that file, False for a
    fresh start unless torch's elastic agent restarted this worker group (then, like True, but a group that
    failed before its first checkpoint starts over). Rank 0 decides and reads; the others receive its answer,
    errors included, so no rank waits in a collective that another has left. ``allow``: see check_resumable.
    """
    restarted = restart_count() > 0
    if not (resume or restarted):
        return None
    state, error = None, None
    if env.is_main:
        try:
            state = _read_resume_state(cfg, resume, restarted, allow)
        except ConfigError as exc:
            error = str(exc)
    state, error = broadcast_from_main((state, error), env)
    if error:
        raise ConfigError(error)
    return state


def _read_resume_state(cfg: Config, resume: bool | str | Path, restarted: bool, allow: frozenset[str]) -> dict | None:
    out_dir = Path(cfg.train.out_dir)
    if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
        try:
            state = load_checkpoint(resume)
        except (FileNotFoundError, CheckpointError) as exc:
            raise ConfigError(str(exc)) from None
    else:
        state = newest_readable(out_dir, warn=lambda line: print(f"disttrain: {line}", file=sys.stderr, flush=True))
        if state is None:
            if not resume:  # restarted before any checkpoint was written: start over
                return None
            raise ConfigError(f"--resume: no readable checkpoint in {checkpoint_dir(out_dir)}")
    check_resumable(cfg, state, allow)
    return state


def check_resumable(cfg: Config, state: dict, allow: frozenset[str] = frozenset()) -> None:
    """Refuse a checkpoint whose run computed a different trajectory (one line naming the keys).

    ``allow``: trajectory keys that may differ all the same, on purpose (a float64 reference continuing a
    float32 checkpoint: {"train.dtype"}; load_state_dict casts the tensors).
    """
    # train.steps moves the end of a cosine/linear/poly decay, and with it every lr: only allowed otherwise.
    allowed = allow if _schedule_uses_total_steps(cfg) else allow | {"train.steps"}
    differ = trajectory_differences(cfg.to_dict(), state["config"], allowed)
    if differ:
        raise ConfigError(f"cannot resume from step {state['step']}: the checkpoint was trained with a different "
                          f"config ({', '.join(differ)} differ); these keys change the trajectory")
    if state["step"] > cfg.train.steps:
        raise ConfigError(f"cannot resume from step {state['step']}: train.steps={cfg.train.steps} is smaller")


def run(cfg: Config, env: DistEnv, console: bool = True, resume: bool | str | Path = False,
        until: int | None = None, allow: frozenset[str] = frozenset()) -> TrainResult:
    """Train per ``cfg`` on this rank; every rank returns the same model and losses.

    ``console``: rank 0 prints a line every ``train.log_every`` steps (metrics.jsonl gets every step anyway).
    ``resume``: continue from a checkpoint (see :func:`resume_state`). ``until``: stop after this many
    completed steps (with a checkpoint there when checkpointing is on) instead of train.steps; no final.pt.
    ``allow``: config keys that may differ from the checkpoint's although they change the trajectory.
    """
    check_world_size(cfg, env.world_size)
    t = cfg.train
    out_dir = Path(t.out_dir)
    dtype = DTYPES[t.dtype]
    stop = t.steps if until is None else min(until, t.steps)
    state = resume_state(cfg, env, resume, allow)
    start = 0 if state is None else state["step"]
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())  # the resolved config of this run
        if state is None:
            clear_checkpoints(out_dir)  # an earlier run's checkpoints must never be resumed into this one
        elif console:
            print(f"resuming from step {start} (checkpoint written by {state['world_size']} processes, now "
                  f"{env.world_size})", flush=True)

    dataset = build_dataset(cfg.data, cfg.model.name, cfg.seed, dtype, loss=t.loss)
    batches = GlobalBatches(dataset, t.global_batch_size, cfg.seed, env.rank, env.world_size)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed, dtype, env.device,
                        example=dataset.x[:2])
    if state is not None:
        model.load_state_dict(state["model"])  # before DDP: its constructor broadcasts rank 0's state anyway
    sync = build_grad_sync(model, cfg.comm, env, batches.local_batch_size, t.global_batch_size)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, base_lr(cfg.optim.lr, t.global_batch_size, cfg.schedule), t.steps,
                                cfg.schedule)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # momentum / Adam moments, and the current lr
        scheduler.load_state_dict(state["scheduler"])  # the step count: lr_at continues from here

    result = TrainResult(model=model, skipped_steps=0 if state is None else state["skipped"], start_step=start,
                         optimizer=optimizer)
    logger = MetricsLogger(out_dir, env, t.log_every, t.steps, console=console, start_step=start)
    metrics = StepMetrics(logger, env, result.losses)
    writer = CheckpointWriter(out_dir, t.keep_checkpoints) if env.is_main and t.checkpoint_every else None
    sync.module.train()
    for step in range(start, stop):
        start_time = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        out = train_step(sync, optimizer, batches.keyed_micro_batches(step, env.device, t.accumulation_steps),
                         cfg.clip, step, loss=t.loss)
        scheduler.step()  # one schedule step per optimizer step (also when a non-finite step was skipped)
        result.grad_norms.append(out.grad_norm)
        result.skipped_steps += not out.stepped
        # The global mean loss, (sum of per-sample losses) / (sum of counts), is reduced over ranks for many
        # steps at once when metrics flush (metrics.py), not with a blocking collective every step.
        metrics.record(step, out.loss_sum, batches.local_batch_size, lr=lr, grad_norm=out.grad_norm,
                       skipped=result.skipped_steps, ms=round(1000 * (time.perf_counter() - start_time), 3))
        done = step + 1
        if t.checkpoint_every and (done % t.checkpoint_every == 0 or done in (stop, t.steps)):
            metrics.flush()  # metrics.jsonl holds every step up to this checkpoint before it exists
            if writer is not None:  # every rank holds the same state: rank 0 writes it, in the background
                writer.submit(training_state(unwrap(sync.module), optimizer, scheduler, done,
                                             result.skipped_steps, cfg.to_dict(), env.world_size))
    metrics.flush()  # result.losses and metrics.jsonl now hold every step
    if writer is not None:
        writer.wait()  # the last checkpoint is durable before the run returns

    model = unwrap(sync.module)
    if env.is_main and stop == t.steps:
        save_final(out_dir / "final.pt", model, t.steps, cfg.to_dict(), env.world_size)
    result.model = model
    return result

"""One builder for a run's parts: the data, the model inside its gradient strategy, the optimizer, the schedule.

Everything that trains or inspects a model builds it here (train, verify and step-wise verify through the
trainer, the benchmarks, the demos, the checks before workers start), so they all see the same data and the same
initial weights for a config. Data flow: config -> data source (data/) -> model (models/, shapes from the
data) -> gradient strategy (parallel/sync.py) -> optimizer -> schedule (schedule.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..parallel.blocks import recomputed, wrap_blocks
from ..parallel.compile import check_compile, compiled, compiled_per_layer, prepare_compile
from ..parallel.sync import GradSync
from ..parallel.strategies import build_grad_sync
from ..config.schema import Config
from ..data.dataset import build_dataset
from ..data.loader import GlobalBatches
from ..data.source import Source
from ..parallel.env import DistEnv
from ..errors import ConfigError
from ..factory import is_import_path, resolve
from ..models.build import build_model
from .precision import LossScaler, configure_numerics
from ..optim.schedule import base_lr, build_scheduler
from ..data.formats import ON_DISK

from ..optim.optimizer import build_optimizer


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """train.dtype's name -> the torch dtype."""
    return DTYPES[name]


def build_data(cfg: Config) -> Source:
    """The run's dataset, in train.dtype, shaped for model.name."""
    return build_dataset(cfg.data, cfg.model.name, cfg.seed, torch_dtype(cfg.train.dtype), loss=cfg.train.loss)


def build_data_and_model(cfg: Config, device: torch.device) -> tuple[Source, nn.Module]:
    """The dataset and the seeded model (the same weights on every rank), on ``device``."""
    data = build_data(cfg)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, torch_dtype(cfg.train.dtype),
                        device, example=data.example() if is_import_path(cfg.model.name) else None,
                        loss=cfg.train.loss)
    if cfg.comm.impl == "fsdp" and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"comm.impl=fsdp: the model {cfg.model.name} has no trainable parameters to shard")
    return data, model


@dataclass
class Parts:
    """What a run trains with on this rank."""

    batches: GlobalBatches  # this rank's slice of every step's global batch
    sync: GradSync  # the model inside its gradient strategy (sync.module: forward; sync.model: the model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: LossScaler  # fp16 loss scaling (the identity for fp32 and bf16)


def build(cfg: Config, env: DistEnv) -> Parts:
    """This rank's parts of a run of ``cfg``, freshly initialised (a resumed run then loads its state)."""
    t = cfg.train
    configure_numerics(env.device, t.tf32, t.deterministic)  # before the model's first matmul on the device
    data, model = build_data_and_model(cfg, env.device)
    # Per block: compiled (train.compile) inside recomputation (model.recompute), before the strategy wraps the
    # model (parallel/compile.py says why in that order).
    sharded = cfg.comm.impl == "fsdp" and env.world_size > 1  # fsdp hooks each layer: compiled beneath them
    wraps = ([compiled_per_layer if sharded else compiled] if t.compile else []) + (
        [recomputed] if cfg.model.recompute else [])
    if t.compile:
        prepare_compile(env.device)
    if wraps:
        wrap_blocks(model, *wraps)
    batches = GlobalBatches(data, t.global_batch_size, cfg.seed, env.rank, env.world_size, cfg.data.workers,
                            cfg.data.prefetch)
    sync = build_grad_sync(model, cfg.comm, env, batches.local_batch_size, t.global_batch_size,
                           force_collectives=cfg.comm.force_collectives)
    optimizer = build_optimizer(sync.model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, base_lr(cfg.optim.lr, t.global_batch_size, cfg.schedule), t.steps,
                                cfg.schedule)
    scaler = LossScaler(t.precision == "fp16", t.loss_scale, t.loss_scale_growth_interval)
    return Parts(batches, sync, optimizer, scheduler, scaler)


def preflight(cfg: Config, build_parts: bool) -> None:
    """Check the config's import paths before any worker starts (an error inside a worker is a failed worker,
    not a user error): import them; with ``build_parts``, also build the data and the model once here, on the
    CPU, so wrong return types and shapes are reported in one line too."""
    paths = [(k, n) for k, n in (("data.name", cfg.data.name), ("model.name", cfg.model.name)) if is_import_path(n)]
    for key, name in paths:
        resolve(key, name)
    if cfg.train.compile and (cfg.train.device == "cpu" or not torch.cuda.is_available()):
        check_compile(torch.device("cpu"))
    if build_parts and (paths or cfg.data.name in ON_DISK):  # on-disk data: its directory and first sample
        data, _ = build_data_and_model(cfg, torch.device("cpu"))
        GlobalBatches(data, cfg.train.global_batch_size, cfg.seed, 0, 1)  # the global batch fits the data

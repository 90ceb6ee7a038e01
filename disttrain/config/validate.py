"""Checks of a whole config: ranges, consistency between keys, and the batch split over a world size.

The schema and types are checked while the config is read (parse.py); this module checks what the
values mean together. Nothing here builds data or a model or imports users' code: checks that need those
run where they are built (build.preflight). Every failure is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..data.formats import FORMATS, ON_DISK
from ..factory import check_name, is_import_path
from ..models.registry import MODELS
from .schema import TOKEN_LOSSES

if TYPE_CHECKING:
    from .schema import Config, DataConfig

BUILTIN_DATA = tuple(FORMATS)
BUILTIN_MODELS = tuple(MODELS)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


DIGITS_SAMPLES = 1797  # sklearn.datasets.load_digits


def validate(cfg: Config) -> None:
    """Range and consistency checks that do not depend on the world size."""
    d, m, o, c, t, sc, cl = cfg.data, cfg.model, cfg.optim, cfg.comm, cfg.train, cfg.schedule, cfg.clip
    _require(cfg.seed >= 0, f"seed: must be >= 0, got {cfg.seed}")
    on_disk = d.name in ON_DISK
    _require(d.num_samples >= (0 if on_disk else 1),
             f"data.num_samples: must be >= {0 if on_disk else 1}, got {d.num_samples}")
    _check_data_files(cfg)
    _check_own_code(cfg)
    if d.name == "digits":
        _require(d.num_samples <= DIGITS_SAMPLES,
                 f"data.num_samples: {d.num_samples} exceeds the {DIGITS_SAMPLES} samples of the digits dataset")
    _require(d.num_classes >= 2, f"data.num_classes: must be >= 2, got {d.num_classes}")
    _require(m.hidden >= 1, f"model.hidden: must be >= 1, got {m.hidden}")
    _require(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    _require(0 <= o.momentum < 1, f"optim.momentum: must be in [0, 1), got {o.momentum}")
    _require(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    _require(not o.nesterov or (o.name == "sgd" and o.momentum > 0),
             "optim.nesterov: true needs optim.name=sgd and optim.momentum > 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas: must be two numbers in [0, 1), got {o.betas}")
    _require(o.eps > 0, f"optim.eps: must be > 0, got {o.eps}")
    _require(c.bucket_mb > 0, f"comm.bucket_mb: must be > 0, got {c.bucket_mb}")
    _require(c.impl != "fsdp" or c.reduce != "max",
             "comm.reduce=max: comm.impl=fsdp reduce-scatters gradients with a sum (mean, sum or avg), there is no max")
    _require(c.reshard_after_forward is None or c.impl == "fsdp",
             f"comm.reshard_after_forward: only for comm.impl=fsdp, not comm.impl={c.impl}")
    _require(c.timeout_s > 0, f"comm.timeout_s: must be > 0, got {c.timeout_s}")
    _require(t.global_batch_size >= 1, f"train.global_batch_size: must be >= 1, got {t.global_batch_size}")
    _require(t.global_batch_size <= d.num_samples or (on_disk and d.num_samples == 0),
             f"train.global_batch_size: {t.global_batch_size} exceeds data.num_samples={d.num_samples}; "
             "a global batch may not repeat a sample")
    _require(t.steps >= 1, f"train.steps: must be >= 1, got {t.steps}")
    _require(t.log_every >= 1, f"train.log_every: must be >= 1, got {t.log_every}")
    _require(t.checkpoint_every >= 0, f"train.checkpoint_every: must be >= 0, got {t.checkpoint_every}")
    _require(t.keep_checkpoints >= 0, f"train.keep_checkpoints: must be >= 0, got {t.keep_checkpoints}")
    _require(bool(t.out_dir.strip()), "train.out_dir: must not be empty")
    _require(t.accumulation_steps >= 1, f"train.accumulation_steps: must be >= 1, got {t.accumulation_steps}")
    _require(t.accumulation_steps <= t.global_batch_size,
             f"train.accumulation_steps={t.accumulation_steps} exceeds train.global_batch_size="
             f"{t.global_batch_size}: every micro-batch needs at least one sample")
    _check_precision(cfg)
    _require(sc.warmup == "none" or sc.warmup_steps <= t.steps,
             f"schedule.warmup_steps={sc.warmup_steps} exceeds train.steps={t.steps}")
    _require(sc.reference_batch_size >= 1,
             f"schedule.reference_batch_size: must be >= 1, got {sc.reference_batch_size}")
    _check_schedule(cfg)
    _require(cl.max_norm > 0, f"clip.max_norm: must be > 0, got {cl.max_norm}")
    _require(cl.norm_type > 0, f"clip.norm_type: must be > 0, got {cl.norm_type}")
    _require(cl.value > 0, f"clip.value: must be > 0, got {cl.value}")
    _require(not cl.before_average or c.impl == "allreduce",
             "clip.before_average: true needs comm.impl=allreduce (DDP reduces gradients during backward, "
             "before anything could clip them)")


def is_power_of_two(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def _check_precision(cfg: Config) -> None:
    t = cfg.train
    _require(t.precision == "fp32" or t.dtype == "float32",
             f"train.precision={t.precision} needs train.dtype=float32 (the master weights), got {t.dtype}")
    _require(is_power_of_two(t.loss_scale),
             f"train.loss_scale: must be a power of two (then scaling is exact), got {t.loss_scale}")
    _require(t.loss_scale_growth_interval >= 1,
             f"train.loss_scale_growth_interval: must be >= 1, got {t.loss_scale_growth_interval}")
    # fp16 decides overflow on the whole reduced gradient (precision.py); under fsdp no rank holds it whole.
    _require(t.precision != "fp16" or cfg.comm.impl != "fsdp",
             "train.precision=fp16 with comm.impl=fsdp: the loss scaler decides overflow on the whole reduced "
             "gradient, which no rank holds under fsdp; use bf16 (no loss scaling) with fsdp")
    _require(t.precision != "fp16" or cfg.clip.nonfinite == "skip",
             "clip.nonfinite=error with train.precision=fp16: loss scaling skips the steps whose gradient "
             "overflowed, by design (use clip.nonfinite=skip)")


def _check_own_code(cfg: Config) -> None:
    """Names, import paths and the keys that go with them (nothing is imported here: see factory.py)."""
    d, m = cfg.data, cfg.model
    check_name("data.name", d.name, BUILTIN_DATA)
    check_name("model.name", m.name, BUILTIN_MODELS)
    own_data, own_model = is_import_path(d.name), is_import_path(m.name)
    _require(own_data or not d.kwargs, f"data.kwargs: only for a data factory, not data.name={d.name}")
    _require(own_model or m.name == "gpt" or not m.kwargs,
             f"model.kwargs: only for a model factory or the gpt, not model.name={m.name}")
    _require(0 <= m.dropout < 1, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _require(not own_model or m.dropout == 0,
             f"model.dropout: applies to the built-in mlp and cnn; a model from {m.name} keeps its own dropout "
             "layers (converted to per-sample dropout)")
    _require(d.crop_padding >= 1, f"data.crop_padding: must be >= 1, got {d.crop_padding}")
    _require(d.augment == "none" or own_data or d.name in ON_DISK or m.name != "mlp",
             f"data.augment={d.augment} needs images: data.name={d.name} gives the mlp vectors")
    _check_language_model(cfg)
    _require(cfg.train.loss != "mse" or own_data or d.name == "arrays",
             f"train.loss=mse needs float targets from a data factory; data.name={d.name} has class labels (or "
             "data.name=arrays with a float y.npy)")


def _check_language_model(cfg: Config) -> None:
    """Token losses (token_cross_entropy, causal_lm) and model.name=gpt go together (or with users' code); the gpt's
    own options (model.kwargs) are checked where it is built (models/gpt.py), before any worker starts."""
    d, m, loss = cfg.data, cfg.model, cfg.train.loss
    tokens = loss in TOKEN_LOSSES
    weighting = cfg.train.token_weighting
    _require(tokens or weighting == "tokens",
             f"train.token_weighting={weighting}: only for train.loss={' or '.join(TOKEN_LOSSES)}, not {loss}")
    _require(weighting != "micro_batch_mean" or cfg.comm.reduce == "avg",
             "train.token_weighting=micro_batch_mean averages per-micro-batch token means, as DDP averages per-rank "
             f"ones: it needs comm.reduce=avg, not {cfg.comm.reduce}")
    _require(not tokens or is_import_path(d.name) or d.name == "tokens",
             f"train.loss={loss} needs token sequences: data.name=tokens or a data factory, not "
             f"data.name={d.name}")
    _require(not tokens or is_import_path(m.name) or m.name == "gpt",
             f"train.loss={loss} needs a language model (model.name=gpt or a model factory); "
             f"model.name={m.name} outputs one row per sample")
    _require(m.name != "gpt" or tokens, f"model.name=gpt outputs logits per token: it needs "
             f"train.loss={' or '.join(TOKEN_LOSSES)}, not train.loss={loss}")
    _require(m.name != "gpt" or m.norm == "none",
             f"model.norm={m.norm}: the gpt has its own LayerNorms (no batch statistics); use model.norm=none")


def _check_data_files(cfg: Config) -> None:
    """The keys of on-disk data and its loader (whether the files exist and hold data: data/, when opened)."""
    d = cfg.data
    on_disk = d.name in ON_DISK
    _require(not on_disk or bool(d.path.strip()), f"data.path: data.name={d.name} reads a directory; set data.path")
    _require(on_disk or not d.path, f"data.path: only for {', '.join(ON_DISK)}, not data.name={d.name}")
    _require(not d.image_size or (d.name == "imagefolder" and len(d.image_size) == 2 and min(d.image_size) >= 1),
             f"data.image_size: must be [H, W] with H, W >= 1, for data.name=imagefolder; got {d.image_size}")
    for key, values in (("mean", d.mean), ("std", d.std)):
        _require(not values or (on_disk and d.name != "tokens"),
                 f"data.{key}: only for imagefolder and arrays, not data.name={d.name}")
    _check_tokens(d)
    _require(len(d.mean) == len(d.std), f"data.mean and data.std: one value per channel each, got {len(d.mean)} "
             f"and {len(d.std)}")
    _require(all(s > 0 for s in d.std), f"data.std: every value must be > 0, got {d.std}")
    _require(d.workers >= 0, f"data.workers: must be >= 0, got {d.workers}")
    _require(d.prefetch >= 1, f"data.prefetch: must be >= 1, got {d.prefetch}")


def _check_tokens(d: DataConfig) -> None:
    """data.name=tokens' own keys (whether the directory holds tokens, and ids below the vocabulary: tokens.py)."""
    tokens = d.name == "tokens"
    _require(not tokens or d.seq_len >= 1, f"data.seq_len: data.name=tokens needs the sequence length T >= 1, got "
             f"{d.seq_len}")
    _require(d.vocab_size >= 0, f"data.vocab_size: must be >= 0 (0: what the directory records), got {d.vocab_size}")
    for key, value in (("seq_len", d.seq_len), ("vocab_size", d.vocab_size), ("pack", d.pack)):
        _require(tokens or not value, f"data.{key}: only for data.name=tokens, not data.name={d.name}")


def checkpoint_format(cfg: Config) -> str:
    """train.checkpoint_format as the run uses it: unset, sharded with comm.impl=fsdp (no rank holds the whole
    state), full otherwise."""
    if cfg.train.checkpoint_format is not None:
        return cfg.train.checkpoint_format
    return "sharded" if cfg.comm.impl == "fsdp" else "full"


def check_world_size(cfg: Config, world_size: int) -> None:
    """Reject batch splits that cannot work: every rank, and every micro-batch, needs at least one sample."""
    b, k = cfg.train.global_batch_size, cfg.train.accumulation_steps
    _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
    _require(b >= world_size,
             f"train.global_batch_size={b} cannot be split over world size {world_size}: "
             f"every rank needs at least one sample (global_batch_size >= world size)")
    smallest = b // world_size  # the smallest local batch (ranks >= B % W hold B // W samples)
    _require(smallest >= k,
             f"train.global_batch_size={b} over world size {world_size} gives local batches of "
             f"{smallest}{'' if b % world_size == 0 else f' to {smallest + 1}'} samples, which cannot be split "
             f"into train.accumulation_steps={k} micro-batches of at least one sample")


def _check_schedule(cfg: Config) -> None:
    """The schedule's own rules are those of the public lr_at/warmup_schedule (optim/schedule.py), one set of
    checks for both; here they name the config keys."""
    from ..optim.schedule import base_lr, check_schedule, schedule_args  # torch: only once a config is checked

    eta = base_lr(cfg.optim.lr, cfg.train.global_batch_size, cfg.schedule)
    try:
        check_schedule(base_lr=eta, total_steps=cfg.train.steps, **schedule_args(cfg.schedule))
    except ValueError as exc:
        raise ConfigError(f"schedule.{exc}") from None


__all__ = ["validate", "check_world_size", "BUILTIN_DATA", "BUILTIN_MODELS", "DIGITS_SAMPLES", "ON_DISK"]

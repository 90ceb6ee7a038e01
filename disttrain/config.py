"""Typed, validated run configuration.

One dataclass per YAML section. Precedence: dataclass defaults < YAML file < ``--set section.key=value``.
Every user error raises :class:`ConfigError` with one line naming the key and what is allowed;
the CLI turns it into exit code 2.

The batch size in the config is *global* (samples per optimizer step over all ranks); per-rank sizes
are derived from it and the world size at run time (:func:`check_world_size`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in the configuration: one line, naming the key."""


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


BUILTIN_DATA = ("synthetic", "digits")
BUILTIN_MODELS = ("mlp", "cnn")


@dataclass
class DataConfig:
    name: str = field(
        default="synthetic", metadata=_doc("synthetic (seeded prototypes plus noise), digits (scikit-learn's 8x8), "
                                           "or 'package.module:function' returning (x, y)"))
    num_samples: int = field(
        default=512, metadata=_doc("samples in the dataset (digits: at most 1797, a seeded subset)"))
    num_classes: int = field(
        default=10, metadata=_doc("classes of the synthetic data or of a data factory's labels (digits has 10)"))
    kwargs: dict[str, Any] = field(
        default_factory=dict, metadata=_doc("keyword arguments of a data factory: function(num_samples, seed, **kwargs)"))
    augment: Literal["none", "flip", "crop", "flip_crop"] = field(
        default="none", metadata=_doc("per-sample image augmentation: horizontal flip, padded random crop, or both"))
    crop_padding: int = field(default=1, metadata=_doc("crop: zero padding on each side before cropping, >= 1"))


@dataclass
class ModelConfig:
    name: str = field(default="mlp", metadata=_doc(
        "mlp on vectors, a small cnn on images, or 'package.module:function' returning an nn.Module"))
    norm: Literal["none", "bn", "syncbn"] = field(
        default="none", metadata=_doc("norm layer slot: none, per-rank BatchNorm (bn), or SyncBatchNorm (syncbn)"))
    hidden: int = field(default=64, metadata=_doc("hidden width (mlp) / channels of the last conv (cnn)"))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "keyword arguments of a model factory: function(input_shape, num_classes, **kwargs)"))
    dropout: float = field(default=0.0, metadata=_doc("per-sample dropout in the mlp / cnn, in [0, 1)"))


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = field(default="sgd", metadata=_doc("optimizer"))
    lr: float = field(default=0.1, metadata=_doc("learning rate, > 0"))
    momentum: float = field(default=0.9, metadata=_doc("sgd momentum, in [0, 1)"))
    weight_decay: float = field(default=1e-4, metadata=_doc("weight decay, >= 0"))
    nesterov: bool = field(default=False, metadata=_doc("sgd Nesterov momentum (needs momentum > 0)"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_doc("adamw betas, each in [0, 1)"))
    eps: float = field(default=1e-8, metadata=_doc("adamw epsilon, > 0"))


@dataclass
class CommConfig:
    impl: Literal["ddp", "allreduce"] = field(
        default="ddp", metadata=_doc("DistributedDataParallel, or explicit bucketed all_reduce after backward"))
    reduce: Literal["mean", "sum", "max", "avg"] = field(
        default="mean", metadata=_doc("gradient reduction: count-weighted mean (exact); for contrast sum, max, or avg "
                                      "(DDP's plain average of local means)"))
    bucket_mb: float = field(default=25.0, metadata=_doc("gradient bucket size in MiB (both implementations), > 0"))
    timeout_s: float = field(
        default=300.0, metadata=_doc("collective timeout in seconds: a dead peer ends the run with an error, > 0"))


@dataclass
class ScheduleConfig:
    warmup: Literal["none", "linear", "constant", "exponential"] = field(
        default="none", metadata=_doc("warmup shape over the first warmup_steps optimizer steps"))
    warmup_steps: int = field(default=5, metadata=_doc("optimizer steps of warmup, >= 0"))
    warmup_start_factor: float = field(default=0.1, metadata=_doc("lr factor at step 0, in (0, 1]"))
    decay: Literal["constant", "cosine", "linear", "poly", "step"] = field(
        default="constant", metadata=_doc("shape after warmup, reaching min_lr at train.steps"))
    min_lr: float = field(default=0.0, metadata=_doc("final lr of cosine/linear/poly decay, in [0, base lr]"))
    power: float = field(default=1.0, metadata=_doc("poly decay exponent, > 0"))
    milestones: list[int] = field(default_factory=list, metadata=_doc("step decay: steps where lr *= gamma"))
    gamma: float = field(default=0.1, metadata=_doc("step decay factor, > 0"))
    scale_lr: bool = field(
        default=False, metadata=_doc("linear scaling rule: base lr = optim.lr * global_batch_size / reference"))
    reference_batch_size: int = field(default=256, metadata=_doc("the batch size optim.lr was tuned for, >= 1"))


@dataclass
class ClipConfig:
    mode: Literal["none", "norm", "value"] = field(
        default="none", metadata=_doc("clip the averaged gradient by global norm, or elementwise by value"))
    max_norm: float = field(default=1.0, metadata=_doc("mode=norm: largest global gradient norm, > 0"))
    norm_type: float = field(default=2.0, metadata=_doc("mode=norm: p of the p-norm (inf allowed), > 0"))
    value: float = field(default=1.0, metadata=_doc("mode=value: clip each gradient entry to [-value, value]"))
    nonfinite: Literal["skip", "error"] = field(
        default="skip", metadata=_doc("inf/nan gradient norm: skip the step on every rank, or stop with an error"))
    before_average: bool = field(
        default=False, metadata=_doc("demonstration only: clip each rank's gradient before averaging (wrong)"))


@dataclass
class TrainConfig:
    global_batch_size: int = field(default=32, metadata=_doc("samples per optimizer step over all ranks"))
    steps: int = field(default=20, metadata=_doc("optimizer steps"))
    accumulation_steps: int = field(
        default=1, metadata=_doc("micro-batches per optimizer step on each rank; gradients communicated once"))
    loss: Literal["cross_entropy", "mse"] = field(
        default="cross_entropy", metadata=_doc("per-sample loss: cross entropy on labels, or mse on float targets"))
    dtype: Literal["float32", "float64"] = field(default="float32", metadata=_doc("parameter and data dtype"))
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata=_doc("auto: cuda:LOCAL_RANK when CUDA is available, else cpu"))
    out_dir: str = field(default="runs/demo", metadata=_doc("run directory: config.yaml, metrics.jsonl, final.pt"))
    log_every: int = field(default=1, metadata=_doc("print a log line every N steps (metrics.jsonl has every step)"))
    checkpoint_every: int = field(
        default=100, metadata=_doc("write a resumable checkpoint every N optimizer steps and at the end; 0: never"))
    keep_checkpoints: int = field(
        default=2, metadata=_doc("keep the newest K checkpoints in out_dir/checkpoints; 0: keep all"))


@dataclass
class Config:
    seed: int = field(default=0, metadata=_doc("seeds model init and the per-epoch data permutation"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- building from plain data

_FLOAT_LITERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " / ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:  # free-form keyword arguments: string keys, any YAML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    # bool is a subclass of int in Python: never let true/false pass as a number, or 1 as a bool.
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string: accept such numeric literals.
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this file, not user error


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (allowed in {where}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", raw[name], tp)
    return cls(**kwargs)


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from plain data (e.g. a resolved config sent to workers)."""
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """defaults < YAML file at ``path`` < ``overrides`` ("section.key=value"), then validate."""
    raw = _read_yaml(path) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


# --------------------------------------------------------------------------- validation

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


DIGITS_SAMPLES = 1797  # sklearn.datasets.load_digits


def validate(cfg: Config) -> None:
    """Range and consistency checks that do not depend on the world size."""
    d, m, o, c, t, sc, cl = cfg.data, cfg.model, cfg.optim, cfg.comm, cfg.train, cfg.schedule, cfg.clip
    _require(cfg.seed >= 0, f"seed: must be >= 0, got {cfg.seed}")
    _require(d.num_samples >= 1, f"data.num_samples: must be >= 1, got {d.num_samples}")
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
    _require(c.timeout_s > 0, f"comm.timeout_s: must be > 0, got {c.timeout_s}")
    _require(t.global_batch_size >= 1, f"train.global_batch_size: must be >= 1, got {t.global_batch_size}")
    _require(t.global_batch_size <= d.num_samples,
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
    _require(sc.warmup_steps >= 0, f"schedule.warmup_steps: must be >= 0, got {sc.warmup_steps}")
    _require(sc.warmup == "none" or sc.warmup_steps <= t.steps,
             f"schedule.warmup_steps={sc.warmup_steps} exceeds train.steps={t.steps}")
    _require(0 < sc.warmup_start_factor <= 1,
             f"schedule.warmup_start_factor: must be in (0, 1], got {sc.warmup_start_factor}")
    _require(sc.power > 0, f"schedule.power: must be > 0, got {sc.power}")
    _require(sc.gamma > 0, f"schedule.gamma: must be > 0, got {sc.gamma}")
    _require(all(m >= 1 for m in sc.milestones) and sc.milestones == sorted(set(sc.milestones)),
             f"schedule.milestones: must be increasing steps >= 1, got {sc.milestones}")
    _require(sc.reference_batch_size >= 1,
             f"schedule.reference_batch_size: must be >= 1, got {sc.reference_batch_size}")
    eta = o.lr * t.global_batch_size / sc.reference_batch_size if sc.scale_lr else o.lr
    _require(0 <= sc.min_lr <= eta, f"schedule.min_lr: must be in [0, base lr={eta:g}], got {sc.min_lr}")
    _require(cl.max_norm > 0, f"clip.max_norm: must be > 0, got {cl.max_norm}")
    _require(cl.norm_type > 0, f"clip.norm_type: must be > 0, got {cl.norm_type}")
    _require(cl.value > 0, f"clip.value: must be > 0, got {cl.value}")
    _require(not cl.before_average or c.impl == "allreduce",
             "clip.before_average: true needs comm.impl=allreduce (DDP reduces gradients during backward, "
             "before anything could clip them)")


def _check_own_code(cfg: Config) -> None:
    """Names, import paths and the keys that go with them (nothing is imported here: see factory.py)."""
    from .factory import check_name, is_import_path

    d, m = cfg.data, cfg.model
    check_name("data.name", d.name, BUILTIN_DATA)
    check_name("model.name", m.name, BUILTIN_MODELS)
    own_data, own_model = is_import_path(d.name), is_import_path(m.name)
    _require(own_data or not d.kwargs, f"data.kwargs: only for a data factory, not data.name={d.name}")
    _require(own_model or not m.kwargs, f"model.kwargs: only for a model factory, not model.name={m.name}")
    _require(0 <= m.dropout < 1, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _require(not own_model or m.dropout == 0,
             f"model.dropout: applies to the built-in mlp and cnn; a model from {m.name} keeps its own dropout "
             "layers (converted to per-sample dropout)")
    _require(d.crop_padding >= 1, f"data.crop_padding: must be >= 1, got {d.crop_padding}")
    _require(d.augment == "none" or own_data or m.name != "mlp",
             f"data.augment={d.augment} needs images: data.name={d.name} gives the mlp vectors")
    _require(cfg.train.loss != "mse" or own_data,
             f"train.loss=mse needs float targets from a data factory; data.name={d.name} has class labels")


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


# Keys that change where, on what and how a run executes or reports, never the trajectory it computes: they may
# differ between a run and its resumption, and between a run and what `verify --against` compares it with.
# (comm.impl and comm.bucket_mb regroup the same sums; the device changes rounding, not the mathematics.)
EXECUTION_KEYS = frozenset({"train.out_dir", "train.log_every", "train.device", "comm.timeout_s", "comm.impl",
                            "comm.bucket_mb", "train.checkpoint_every", "train.keep_checkpoints"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 3}} -> {"train.steps": 3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trajectory_differences(ours: dict[str, Any], theirs: dict[str, Any], also_allowed: frozenset[str] = frozenset()
                           ) -> list[str]:
    """The dotted keys of two config dicts that differ and would change the training trajectory."""
    a, b = flatten(ours), flatten(theirs)
    allowed = EXECUTION_KEYS | also_allowed
    return sorted(k for k in a.keys() | b.keys() if k not in allowed and a.get(k) != b.get(k))


def reference_table() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every config key: the README's config reference."""
    rows = []

    def walk(cls: type, prefix: str, instance: Any) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.", value)
            else:
                rows.append((f"{prefix}{f.name}", _type_name(hints[f.name]), repr(value), f.metadata.get("help", "")))

    walk(Config, "", Config())
    return rows


__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "CommConfig", "ScheduleConfig",
           "ClipConfig", "TrainConfig",
           "load_config", "config_from_dict", "validate", "check_world_size", "reference_table", "EXECUTION_KEYS",
           "flatten", "trajectory_differences"]

"""Typed, validated run configuration.

One dataclass per YAML section. Precedence: dataclass defaults < YAML file < ``--set section.key=value``.
Every user error raises :class:`ConfigError` with one line naming the key and what is allowed;
the CLI turns it into exit code 2.

The batch size in the config is *global* (samples per optimizer step over all ranks); per-rank sizes
are derived from it and the world size at run time (validate.check_world_size).

This module is the schema only: it imports no reader and no validator. Reading and type checks: parse.py;
range and consistency checks: validate.py; which keys change the trajectory: identity.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..data.formats import ON_DISK
from ..parallel.registry import STRATEGY_NAMES

# train.loss: per-sample losses, then losses per target token (counted over the global batch: run/loss.py).
TOKEN_LOSSES = ("token_cross_entropy", "causal_lm")
LOSSES = ("cross_entropy", "mse", *TOKEN_LOSSES)
IN_MEMORY_SAMPLES = 512  # data.num_samples of synthetic, digits and factory data when unset


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DataConfig:
    name: str = field(
        default="synthetic", metadata=_doc("synthetic (seeded prototypes plus noise), digits (scikit-learn's 8x8), "
                                           "imagefolder, arrays or tokens (on disk, data.path), or 'package.module:function' "
                                           "returning (x, y) or a map-style dataset"))
    num_samples: int | None = field(
        default=None, metadata=_doc("samples in the dataset; unset: 512 (in memory) or 0 (on disk); on disk, 0 is "
                                    "every sample and N a seeded subset (digits: at most 1797, a seeded subset)"))
    path: str = field(default="", metadata=_doc(
        "imagefolder: DIR/CLASS_NAME/*.png|jpg|jpeg (labels from the sorted class names); arrays: DIR/x.npy (N, ...) "
        "and DIR/y.npy (N,), memory-mapped; tokens: a token directory (disttrain data export text) or nanoGPT's train.bin"))
    image_size: list[int] = field(default_factory=list, metadata=_doc(
        "imagefolder: resize every image to [H, W]; empty: every image must have the same size"))
    mean: list[float] = field(default_factory=list, metadata=_doc(
        "on-disk data: per-channel mean subtracted from the inputs in [0, 1] (empty: none)"))
    std: list[float] = field(default_factory=list, metadata=_doc(
        "on-disk data: per-channel std the inputs are divided by, each > 0 (empty: none)"))
    workers: int = field(default=0, metadata=_doc(
        "loader worker processes per rank (torch DataLoader); 0: batches are read in the training process"))
    prefetch: int = field(default=2, metadata=_doc("data.workers > 0: batches each worker reads ahead, >= 1"))
    num_classes: int = field(
        default=10, metadata=_doc("classes of the synthetic data or of a data factory's labels (digits has 10; "
                                   "imagefolder: its class folders; arrays: the largest label + 1)"))
    kwargs: dict[str, Any] = field(
        default_factory=dict, metadata=_doc("keyword arguments of a data factory: function(num_samples, seed, **kwargs)"))
    augment: Literal["none", "flip", "crop", "flip_crop"] = field(
        default="none", metadata=_doc("per-sample image augmentation: horizontal flip, padded random crop, or both"))
    crop_padding: int = field(default=1, metadata=_doc("crop: zero padding on each side before cropping, >= 1"))
    seq_len: int = field(default=0, metadata=_doc(
        "tokens: T, the input length of a sample (at most T targets each), >= 1; the gpt's context follows it"))
    vocab_size: int = field(default=0, metadata=_doc(
        "tokens: the vocabulary size (the model's output width); 0: what the directory records (required for a "
        "bare train.bin)"))
    pack: bool = field(default=False, metadata=_doc(
        "tokens: fixed windows of seq_len targets across document boundaries (every sample full), instead of each "
        "document cut into its own chunks (the last one shorter); a bare train.bin is packed only"))

    def __post_init__(self) -> None:
        if self.num_samples is None:  # resolved at once, so config.yaml and checkpoints hold the number
            self.num_samples = 0 if self.name in ON_DISK else IN_MEMORY_SAMPLES


@dataclass
class ModelConfig:
    name: str = field(default="mlp", metadata=_doc(
        "mlp on vectors, a small cnn on images, gpt (a causal transformer on token ids, for "
        "train.loss=token_cross_entropy), or 'package.module:function' returning an nn.Module"))
    norm: Literal["none", "bn", "syncbn"] = field(
        default="none", metadata=_doc("norm layer slot: none, per-rank BatchNorm (bn), or SyncBatchNorm (syncbn)"))
    hidden: int = field(default=64, metadata=_doc(
        "hidden width (mlp) / channels of the last conv (cnn) / embedding width (gpt)"))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "keyword arguments of a model factory: function(input_shape, num_classes, **kwargs)"))
    dropout: float = field(default=0.0, metadata=_doc("per-sample dropout in the mlp / cnn / gpt, in [0, 1)"))
    recompute: bool = field(default=False, metadata=_doc(
        "activation recomputation: keep only each block's input for backward and run the block again there "
        "(less memory, about one more forward; the same result bitwise)"))


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
    impl: Literal[STRATEGY_NAMES] = field(
        default="ddp", metadata=_doc("DistributedDataParallel, explicit bucketed all_reduce after backward, or fsdp "
                                     "(sharded parameters, gradients and optimizer state: FSDP2)"))
    reduce: Literal["mean", "sum", "max", "avg"] = field(
        default="mean", metadata=_doc("gradient reduction: count-weighted mean (exact); for contrast sum, max, or avg "
                                      "(DDP's plain average of local means)"))
    bucket_mb: float = field(default=25.0, metadata=_doc("gradient bucket size in MiB (both implementations), > 0"))
    timeout_s: float = field(
        default=300.0, metadata=_doc("collective timeout in seconds: a dead peer ends the run with an error, > 0"))
    reshard_after_forward: bool | None = field(
        default=None, metadata=_doc("fsdp only: free each block's gathered parameters after forward and gather them "
                                    "again in backward (true, the default: ZeRO-3-like), or keep them (false: "
                                    "ZeRO-2-like)"))
    force_collectives: bool = field(
        default=False, metadata=_doc("a check of the collective path on one device (tools/gpu_check.sh): build "
                                     "comm.impl and SyncBatchNorm's collectives even when W=1 (same result, slower)"))


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
    loss: Literal[LOSSES] = field(
        default="cross_entropy", metadata=_doc(
            "per-sample loss: cross entropy on labels, or mse on float targets; or token_cross_entropy: logits "
            "(N, T, V), integer targets (N, T) with -100 ignored, the mean over the global batch's target tokens; "
            "or causal_lm: the same with Hugging Face's unshifted labels (labels = input_ids), shifted in the loss"))
    token_weighting: Literal["tokens", "micro_batch_mean", "sequence_mean"] = field(
        default="tokens", metadata=_doc(
            "token_cross_entropy: tokens (each target token weighs alike: exact); for contrast micro_batch_mean (each "
            "micro-batch's token mean, averaged: transformers' accumulation before PR #34191; needs comm.reduce=avg), "
            "or sequence_mean (each sequence's token mean, averaged over sequences: another objective)"))
    dtype: Literal["float32", "float64"] = field(default="float32", metadata=_doc("parameter and data dtype"))
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata=_doc("compute precision of forward and loss: fp32, or autocast to bf16 / fp16 with "
                                      "float32 master weights, gradients and optimizer state (needs dtype float32)"))
    loss_scale: float = field(default=65536.0, metadata=_doc(
        "precision=fp16: initial loss scale, a power of two; halves on a step whose reduced gradient overflowed"))
    loss_scale_growth_interval: int = field(default=2000, metadata=_doc(
        "precision=fp16: the loss scale doubles after this many finite steps in a row, >= 1"))
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata=_doc("auto: cuda:LOCAL_RANK when every rank on the node has a GPU, else cpu (with "
                                      "one line saying so); cuda: an error unless every rank has its own GPU"))
    tf32: bool = field(default=False, metadata=_doc(
        "CUDA: let float32 matmuls and convolutions run in TF32 (~1e-3 relative; verify's tolerance widens to "
        "fp16's); false: IEEE float32"))
    deterministic: bool = field(default=False, metadata=_doc(
        "torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8 and deterministic cuDNN: bitwise "
        "repeatable runs on one CUDA device (slower)"))
    out_dir: str = field(default="runs/demo", metadata=_doc("run directory: config.yaml, metrics.jsonl, final.pt"))
    log_every: int = field(default=1, metadata=_doc("print a log line every N steps (metrics.jsonl has every step)"))
    checkpoint_every: int = field(
        default=100, metadata=_doc("write a resumable checkpoint every N optimizer steps and at the end; 0: never"))
    keep_checkpoints: int = field(
        default=2, metadata=_doc("keep the newest K checkpoints in out_dir/checkpoints; 0: keep all"))
    checkpoint_format: Literal["sharded", "full"] | None = field(default=None, metadata=_doc(
        "sharded: a directory per step, every rank writing its own part through torch.distributed.checkpoint; "
        "full: one file of the whole state written by rank 0; null: sharded with comm.impl=fsdp, else full"))
    checkpoint_async: bool = field(default=True, metadata=_doc(
        "write each checkpoint in the background from a copy taken at the step (the loop waits for the copy "
        "only); false: the loop waits until it is on disk"))
    tensorboard: bool = field(
        default=True, metadata=_doc("rank 0 writes TensorBoard events of every step to out_dir/tensorboard"))
    compile: bool = field(default=False, metadata=_doc(
        "torch.compile each block of the model (inside recomputation, before the strategy wraps it); on the CPU "
        "needs a C++ compiler"))


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

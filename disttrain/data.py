"""The global batch is the unit of data.

For optimizer step k, every rank computes the same global batch: positions [kB, (k+1)B) of an endless
stream made of one seeded permutation of the dataset per epoch (the same permutation on all ranks,
because it depends only on (seed, epoch)). Rank r then takes a contiguous slice of that batch of size
B//W + (1 if r < B%W else 0). The union of the W slices is exactly the single-device batch, for any
W <= B: no padding and no repeated samples (unlike torch's DistributedSampler, which pads the last
batch by repeating samples and strides across the dataset).

Each sample of a step's batch is named by (step, its position in the global batch); augmentation draws
from those keys (randomness.py), so a sample is cropped and flipped the same way on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .factory import call_factory, is_import_path
from .randomness import AUGMENT_STREAM, SampleKeys, uniform


# --------------------------------------------------------------------------- sharding arithmetic

def local_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """Samples rank ``rank`` holds: B//W, plus one for the first B%W ranks."""
    base, extra = divmod(global_batch_size, world_size)
    return base + (1 if rank < extra else 0)


def local_slice(global_batch_size: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous slice of the global batch."""
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + local_batch_size(global_batch_size, world_size, rank))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch), identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def global_batch_indices(step: int, global_batch_size: int, num_samples: int, seed: int) -> np.ndarray:
    """Dataset indices of optimizer step ``step``'s global batch (positions [kB, (k+1)B), epochs wrapping)."""
    if global_batch_size > num_samples:
        raise ValueError(f"global batch {global_batch_size} larger than the dataset ({num_samples})")
    start = step * global_batch_size
    stop = start + global_batch_size
    first_epoch, last_epoch = start // num_samples, (stop - 1) // num_samples
    stream = np.concatenate([epoch_permutation(num_samples, seed, e) for e in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * num_samples
    return stream[offset: offset + global_batch_size]


# --------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    """A whole dataset held in memory: inputs ``x`` (N, *shape) and targets ``y``: integer labels (N,) for
    cross entropy, or float targets (N, num_classes) for mse; ``num_classes`` is the model's output width.
    ``augment`` is applied to image batches as they are drawn (:meth:`GlobalBatches.batch`)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    augment: str = "none"
    crop_padding: int = 1

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _synthetic(cfg: DataConfig, image: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each class a random prototype (a vector, or a 3x8x8 image), each sample its prototype plus noise:
    learnable by the mlp and the cnn alike, and seeded."""
    rng = np.random.default_rng([seed, 2024])
    shape = (3, 8, 8) if image else (32,)
    y = rng.integers(0, cfg.num_classes, cfg.num_samples)
    prototypes = rng.standard_normal((cfg.num_classes, *shape))
    x = prototypes[y] + rng.standard_normal((cfg.num_samples, *shape))
    return x, y, cfg.num_classes


def _digits(cfg: DataConfig, image: bool, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's bundled 8x8 handwritten digits (read from the package, no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data.name=digits needs scikit-learn: pip install 'disttrain[digits]'") from None
    digits = load_digits()
    keep = np.sort(np.random.default_rng([seed, 1797]).permutation(len(digits.target))[: cfg.num_samples])
    x = digits.images[keep] / 16.0  # pixel values 0..16
    x = (x - 0.3) / 0.35  # roughly zero mean, unit variance
    x = x[:, None, :, :] if image else x.reshape(len(keep), 64)
    return x, digits.target[keep], 10


def build_dataset(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype,
                  loss: str = "cross_entropy") -> Dataset:
    """The dataset in the shape the model wants: built-in data as vectors for the mlp and (C, 8, 8) images
    for every other model; a data factory's (``data.name: module:function``) as it returns it, checked."""
    if is_import_path(cfg.name):
        x, y, num_classes = _from_factory(cfg, seed, dtype, loss)
    else:
        make = {"synthetic": _synthetic, "digits": _digits}[cfg.name]
        x, y, num_classes = make(cfg, model_name != "mlp", seed)
        x, y = torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long)
    if cfg.augment != "none" and x.dim() != 4:
        raise ConfigError(f"data.augment={cfg.augment} needs images (N, C, H, W), but the inputs have shape "
                          f"{tuple(x.shape)}")
    return Dataset(x, y, num_classes, cfg.augment, cfg.crop_padding)


def _from_factory(cfg: DataConfig, seed: int, dtype: torch.dtype, loss: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Call ``function(num_samples, seed, **kwargs)``; it returns (x, y) or a map-style dataset of (x, y)."""
    path = cfg.name
    out = call_factory("data.name", path, cfg.num_samples, seed, **cfg.kwargs)
    where = f"data.name: {path!r}"
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in out):
        x, y = (torch.as_tensor(t) for t in out)
    elif hasattr(out, "__len__") and hasattr(out, "__getitem__") and not isinstance(out, (str, bytes, dict)):
        x, y = _materialise(out, where)
    else:
        raise ConfigError(f"{where} returned {type(out).__name__}; expected (x, y) tensors or a map-style dataset "
                          "of (x, y) pairs")
    if x.dim() < 2 or len(x) != cfg.num_samples or len(y) != cfg.num_samples:
        raise ConfigError(f"{where} returned x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}; expected "
                          f"data.num_samples={cfg.num_samples} samples in both (x: (N, ...) with N = {cfg.num_samples})")
    if x.is_floating_point():
        x = x.to(dtype)  # integer inputs (token ids, say) are kept as they are
    if loss == "mse":
        if not y.is_floating_point() or y.dim() > 2:
            raise ConfigError(f"{where} returned y of dtype {y.dtype} and shape {tuple(y.shape)}; train.loss=mse "
                              "needs float targets of shape (N,) or (N, outputs)")
        y = y.to(dtype).reshape(len(y), -1)
        return x, y, y.shape[1]
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise ConfigError(f"{where} returned y of dtype {y.dtype} and shape {tuple(y.shape)}; "
                          "train.loss=cross_entropy needs integer class labels of shape (N,)")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= cfg.num_classes:
        raise ConfigError(f"{where} returned labels in [{low}, {high}]; data.num_classes={cfg.num_classes} allows "
                          f"0 to {cfg.num_classes - 1}")
    return x, y.long(), cfg.num_classes


def _materialise(dataset, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style dataset, read once into two tensors."""
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"{where} returned a dataset whose item {i} is {type(item).__name__}, not an (x, y) pair")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise ConfigError(f"{where} returned an empty dataset")
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as exc:
        raise ConfigError(f"{where} returned a dataset whose items differ in shape: "
                          f"{str(exc).strip().splitlines()[0]}") from None


# --------------------------------------------------------------------------- augmentation

def augment_images(x: torch.Tensor, keys: SampleKeys, mode: str, padding: int) -> torch.Tensor:
    """Per-sample augmentation of images (N, C, H, W): ``crop`` (a random H x W window of the image zero-padded
    by ``padding`` on each side), ``flip`` (horizontal, with probability 1/2), ``flip_crop`` (crop, then flip).

    Sample i's flip and offsets are drawn from its own keys (three uniforms of the augmentation stream), so
    they are the same whichever rank or micro-batch holds it.
    """
    if mode == "none":
        return x
    u = uniform(keys, AUGMENT_STREAM, 3, x.device)
    n, c, h, w = x.shape
    pad = padding if mode in ("crop", "flip_crop") else 0
    source = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    # Offsets uniform in {0, ..., 2 * pad}: the corner of a window of the original size.
    top = (u[:, 1] * (2 * pad + 1)).long()[:, None]
    left = (u[:, 2] * (2 * pad + 1)).long()[:, None]
    rows = top + torch.arange(h, device=x.device)  # (n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if mode in ("flip", "flip_crop"):
        cols = torch.where(u[:, :1] < 0.5, (w - 1) - cols, cols)  # a flipped window reads its columns backwards
    cols = left + cols  # (n, w)
    # Crop and flip are one gather from each padded image, the same for every channel.
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return source.reshape(n, c, -1).gather(2, index).reshape(n, c, h, w)


class GlobalBatches:
    """This rank's slice of every step's global batch."""

    def __init__(self, dataset: Dataset, global_batch_size: int, seed: int, rank: int, world_size: int):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.slice = local_slice(global_batch_size, world_size, rank)

    @property
    def local_batch_size(self) -> int:
        return self.slice.stop - self.slice.start

    def indices(self, step: int) -> np.ndarray:
        return global_batch_indices(step, self.global_batch_size, len(self.dataset), self.seed)[self.slice]

    def keys(self, step: int) -> SampleKeys:
        """The samples this rank holds at ``step``: their positions in the global batch."""
        return SampleKeys(self.seed, step, torch.arange(self.slice.start, self.slice.stop))

    def keyed_batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, SampleKeys]:
        """This rank's (x, y) of ``step``, augmented per sample, and the samples' keys."""
        idx = torch.as_tensor(self.indices(step))
        keys = self.keys(step)
        x = augment_images(self.dataset.x[idx].to(device), keys, self.dataset.augment, self.dataset.crop_padding)
        return x, self.dataset.y[idx].to(device), keys

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.keyed_batch(step, device)
        return x, y

    def keyed_micro_batches(self, step: int, device: torch.device,
                            k: int) -> list[tuple[torch.Tensor, torch.Tensor, SampleKeys]]:
        """This rank's batch cut into ``k`` contiguous micro-batches, sized like rank slices (b//k, +1 first),
        each with its samples' keys."""
        x, y, keys = self.keyed_batch(step, device)
        return [(x[s], y[s], keys.select(s)) for s in (local_slice(len(y), k, j) for j in range(k))]

    def micro_batches(self, step: int, device: torch.device, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`keyed_micro_batches` without the keys."""
        return [(x, y) for x, y, _ in self.keyed_micro_batches(step, device, k)]

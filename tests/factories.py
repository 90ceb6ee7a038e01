"""Users' code as disttrain imports it by path in the tests: good factories and every kind of bad one."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(width), nn.Dropout2d(dropout), ResidualBlock(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def tiny_resnet(input_shape, num_classes, width=4, dropout=0.0):
    return TinyResNet(input_shape[0], num_classes, width, dropout)


def images(num_samples, seed, size=6, channels=2, num_classes=3):
    """Class prototypes plus noise, as (x, y) numpy arrays (float64 images, int64 labels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, num_samples)
    x = rng.standard_normal((num_classes, channels, size, size))[y] + rng.standard_normal((num_samples, channels,
                                                                                           size, size))
    return x, y


class PairDataset:
    """A map-style dataset of (x, y) pairs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.as_tensor(self.x[i]), int(self.y[i])


def image_dataset(num_samples, seed):
    return PairDataset(*images(num_samples, seed))


def regression(num_samples, seed, features=5, outputs=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=g, dtype=torch.float64)
    w = torch.randn(features, outputs, generator=g, dtype=torch.float64)
    return x, torch.tanh(x @ w) + 0.1 * torch.randn(num_samples, outputs, generator=g, dtype=torch.float64)


def regressor(input_shape, num_classes, hidden=8, dropout=0.1):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


# --------------------------------------------------------------------------- bad factories

NOT_CALLABLE = 3


def raises(input_shape, num_classes):
    raise ValueError("width must be even\nsecond line")


def not_a_module(input_shape, num_classes):
    return [nn.Linear(2, 2)]


def wrong_width(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))


def fails_in_forward(input_shape, num_classes):
    return nn.Linear(7, num_classes)  # the inputs have another size


def not_data(num_samples, seed):
    return "x, y"


def too_few(num_samples, seed):
    x, y = images(num_samples, seed)
    return x[:-1], y[:-1]


def float_labels(num_samples, seed):
    x, y = images(num_samples, seed)
    return x, y.astype(np.float64)


def labels_too_large(num_samples, seed):
    x, y = images(num_samples, seed)
    return x, y + 2


def not_pairs(num_samples, seed):
    return [torch.zeros(3)] * num_samples


def vectors(num_samples, seed):
    return torch.zeros(num_samples, 4), torch.zeros(num_samples, dtype=torch.long)


class CountingDataset(PairDataset):
    """A map-style dataset that records which items were read (per process)."""

    reads: list[int] = []

    def __getitem__(self, i):
        CountingDataset.reads.append(i)
        return super().__getitem__(i)


def counting_images(num_samples, seed):
    CountingDataset.reads = []
    return CountingDataset(*images(num_samples, seed))


class KeyedFlipDataset(PairDataset):
    """A map-style dataset with its own random transform, drawn from each sample's keys: a horizontal flip."""

    def getitem_keyed(self, i, keys):
        from disttrain.randomness import AUGMENT_STREAM, uniform

        x, y = self[i]
        flip = uniform(keys, AUGMENT_STREAM, 1, call=1)[0, 0] < 0.5
        return (x.flip(-1) if flip else x), y


def keyed_flip_images(num_samples, seed):
    return KeyedFlipDataset(*images(num_samples, seed))


class _FirstColumns(nn.Module):
    """A model without parameters: the first ``n`` input features as the output."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :self.n]


def no_parameters(input_shape, num_classes):
    return _FirstColumns(num_classes)


class MemmapRows:
    """The "Your data" pattern: a numpy memmap opened in ``__init__``, one row per ``__getitem__``."""

    def __init__(self, path: str):
        self.x = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].astype(np.float64), i % 3


def memmap_rows(num_samples, seed, path):
    return MemmapRows(path)


def padded_tokens(num_samples, seed, seq_len=8, vocab=13, empty=(), inputs="int64"):
    """Token sequences of random length 0..seq_len, right-padded: x (N, T) ids (0 after the end), y (N, T) the next
    ids, -100 at padding. ``empty``: (global_batch_size, world_size, rank, steps): every sample that rank holds in
    those steps (a number: the first steps; or a list) has no target, so that rank holds none. ``inputs="float32"``: float inputs (a user error)."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, vocab, (num_samples, seq_len + 1))
    lengths = rng.integers(0, seq_len + 1, num_samples)  # targets per sample, 0 included
    if empty:
        from disttrain.data.batching import global_batch_indices, local_slice
        batch, world_size, rank, steps = empty
        for step in (range(steps) if isinstance(steps, int) else steps):
            lengths[global_batch_indices(step, batch, num_samples, seed)[local_slice(batch, world_size, rank)]] = 0
    position = np.arange(seq_len)[None, :]
    x = np.where(position < np.maximum(lengths, 1)[:, None], tokens[:, :-1], 0)
    y = np.where(position < lengths[:, None], tokens[:, 1:], -100)
    return x.astype(inputs), y


def targets_out_of_range(num_samples, seed):
    x, y = padded_tokens(num_samples, seed)
    y[0, 0] = 13
    return x, y


class TinyLM(nn.Module):
    """A user's language model: embedding, a GRU, a head: logits (N, T, V)."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def tiny_lm(input_shape, num_classes, width=8):
    return TinyLM(num_classes, width)


class _LastPosition(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[:, -1]


def last_position_lm(input_shape, num_classes):
    """Logits (N, V): one row per sequence, not per token (a user error under token_cross_entropy)."""
    return _LastPosition(num_classes)


class HFLogits(nn.Module):
    """A Hugging Face causal LM wrapped to return its ``.logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def hf_gpt2(input_shape, num_classes, width=16, layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=num_classes, n_positions=input_shape[0], n_embd=width, n_layer=layers, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return HFLogits(GPT2LMHeadModel(cfg))


def signals_the_launcher(num_samples, seed):
    """Images, after sending SIGTERM to the ``--nproc`` launcher from rank 0 while the workers start (a scheduler's
    signal that comes before the first step)."""
    import os
    import signal
    import time

    if os.environ.get("RANK") == "0" and "DISTTRAIN_LAUNCHER_PID" in os.environ:
        os.kill(int(os.environ["DISTTRAIN_LAUNCHER_PID"]), signal.SIGTERM)
        time.sleep(60)  # the launcher forwards the signal: it ends this build
    return images(num_samples, seed)

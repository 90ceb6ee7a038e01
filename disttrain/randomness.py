"""Per-sample randomness: random draws that belong to the sample, not to the process.

A W-process run equals one device only if every random draw is the same in both. A per-process RNG
(torch's dropout, torchvision's transforms) cannot give that: rank r's generator has drawn for other
samples before, and the one device's generator for all of them. So every draw here is a pure function
of *which sample it is for*:

    u = uniform(seed, step, position, stream, call, counter)

- ``step``: the optimizer step k; ``position``: the sample's place i in step k's global batch (0..B-1).
  The pair names the sample uniquely, whichever rank or micro-batch holds it and however many ranks
  there are (a dataset index would not: a batch that wraps an epoch can hold one sample twice).
- ``stream``: who draws: 0 is data augmentation, 1, 2, ... are the dropout layers of a model (in
  ``named_modules`` order, :func:`assign_streams`), so two layers draw different masks.
- ``call``: how often that layer has already run in the current forward (a layer applied twice draws
  twice); ``counter``: the element within the sample (j-th entry of its mask).

The generator is counter-based (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011, the
idea behind Philox): no state is carried from one draw to the next, each draw is a hash of its key and
counter. The hash is a 32-bit xorshift-multiply bijection (``[16 21f0aaad 15 735a2d97 15]`` from C.
Wellons' hash-prospector), applied in chains. It runs as int64 tensor arithmetic vectorised over the
batch, and no product reaches 2^63, so it is exact: the same bits on CPU and CUDA, by construction.
Uniforms are the 32-bit words / 2^32; a dropout mask compares the words with an integer threshold.

The keys of the samples in the current forward are set with :func:`sample_keys` (a context variable,
entered around forward by the training step); :class:`SampleDropout` reads them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

_M32 = 0xFFFFFFFF
AUGMENT_STREAM = 0  # data augmentation; dropout layers get streams 1, 2, ...
# The hash's two multipliers are below 2^31: a 32-bit word times either stays below 2^63, so int64 is exact.
_C1, _C2 = 0x21F0AAAD, 0x735A2D97


def mix32(x: int | torch.Tensor) -> int | torch.Tensor:
    """A bijective 32-bit hash (xorshift-multiply, constants from hash-prospector); ``x`` a Python int or an
    int64 tensor with values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place on an int64 tensor (one scratch buffer: this is the per-element hot loop)."""
    t = x >> 16
    x ^= t
    x.mul_(_C1).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x ^= t
    x.mul_(_C2).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x ^= t
    return x


def _base_key(seed: int, step: int, stream: int, call: int) -> int:
    h = 0x9E3779B9
    for word in (seed, seed >> 32, step, step >> 32, stream, call):
        h = mix32(h ^ (word & _M32))
    return h


@dataclass(frozen=True)
class SampleKeys:
    """Which samples a batch holds: their positions in optimizer step ``step``'s global batch."""

    seed: int
    step: int
    positions: torch.Tensor  # int64, one per sample, in batch order

    def __len__(self) -> int:
        return len(self.positions)

    def select(self, index: slice) -> SampleKeys:
        return SampleKeys(self.seed, self.step, self.positions[index])


def random_bits(keys: SampleKeys, stream: int, count: int, device: torch.device | str = "cpu",
                call: int = 0) -> torch.Tensor:
    """``count`` random 32-bit words per sample, shape (len(keys), count), int64 in [0, 2^32).

    Row i depends only on (seed, step, positions[i], stream, call): the same on every rank and device.
    """
    base = _base_key(keys.seed, keys.step, stream, call)
    # mix32 is a bijection: distinct positions give distinct per-sample keys, never a shared stream. The
    # counters are hashed before they are added, so two samples' streams are not shifted copies of each other.
    per_sample = mix32(keys.positions.to(device=device, dtype=torch.int64) ^ base)
    counters = mix32(torch.arange(count, device=device, dtype=torch.int64))
    bits = per_sample[:, None] + counters[None, :]
    return _mix32_(bits.bitwise_and_(_M32))


def uniform(keys: SampleKeys, stream: int, count: int, device: torch.device | str = "cpu",
            call: int = 0) -> torch.Tensor:
    """:func:`random_bits` as uniforms in [0, 1), float64 (bits / 2^32, exact)."""
    return random_bits(keys, stream, count, device, call).to(torch.float64) * 2.0**-32


# --------------------------------------------------------------------------- the current forward's samples

@dataclass
class _Forward:
    keys: SampleKeys
    calls: dict[int, int] = field(default_factory=dict)

    def next_call(self, stream: int) -> int:
        call = self.calls.get(stream, 0)
        self.calls[stream] = call + 1
        return call


_CURRENT: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar("disttrain_sample_keys", default=None)


@contextlib.contextmanager
def sample_keys(keys: SampleKeys) -> Iterator[None]:
    """Run a forward on the samples named by ``keys``: per-sample layers inside draw from their keys.

    Enter it once per forward (per micro-batch): each entry restarts the per-layer call counts, so a
    sample's draws do not depend on which micro-batch holds it.
    """
    token = _CURRENT.set(_Forward(keys))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def replay_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(a context for a forward segment, a context for its replay) for activation recomputation (blocks.py).

    A recomputed segment runs again during backward, outside :func:`sample_keys` and after the rest of the
    forward has advanced the per-layer call counts. Called when the segment first runs, this snapshots the keys
    and call counts; the replay context restores them, so every per-sample layer draws the same masks again.
    Outside :func:`sample_keys` both contexts do nothing.
    """
    current = _CURRENT.get()
    if current is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    keys, calls = current.keys, dict(current.calls)

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        token = _CURRENT.set(_Forward(keys, dict(calls)))
        try:
            yield
        finally:
            _CURRENT.reset(token)
    return contextlib.nullcontext(), replay()


# --------------------------------------------------------------------------- dropout

class SampleDropout(nn.Module):
    """Dropout whose mask for each sample is drawn from that sample's keys (see the module docstring).

    Same distribution and scaling as ``nn.Dropout`` (``channelwise``: as ``nn.Dropout1d/2d/3d``, one draw
    per sample and channel). Eval mode, or p = 0: the identity. Training mode needs the keys of the
    batch (:func:`sample_keys`, which disttrain's training step enters) and a stream (:func:`assign_streams`,
    which ``build_model`` and :func:`convert_dropout` call); without them it raises rather than fall back
    to a per-process generator, which would silently break equivalence.
    """

    compile_eagerly = True  # train.compile leaves it out of the compiled parts of its block (parallel/compile.py)

    def __init__(self, p: float = 0.5, channelwise: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.channelwise = channelwise
        self.stream: int | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, channelwise={self.channelwise}, stream={self.stream}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self._mask(x)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        current = _CURRENT.get()
        if current is None:
            raise RuntimeError("SampleDropout in training mode needs the keys of the batch's samples: run the "
                               "forward inside disttrain.randomness.sample_keys(keys)")
        if self.stream is None:
            raise RuntimeError("SampleDropout has no stream: call disttrain.randomness.assign_streams(model)")
        if x.shape[0] != len(current.keys):
            raise RuntimeError(f"SampleDropout got a batch of {x.shape[0]} samples but keys for {len(current.keys)}")
        shape = (x.shape[1],) + (1,) * (x.dim() - 2) if self.channelwise else x.shape[1:]
        count = 1
        for s in shape:
            count *= s
        bits = random_bits(current.keys, self.stream, count, x.device, call=current.next_call(self.stream))
        # Kept with probability 1 - p (bits / 2^32 >= p, exactly) and scaled by 1/(1 - p), as torch does.
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        return (bits >= math.ceil(self.p * 2.0**32)).to(x.dtype).mul_(scale).reshape(x.shape[0], *shape)


def assign_streams(module: nn.Module) -> nn.Module:
    """Number the SampleDropout layers of ``module`` 1, 2, ... in ``named_modules`` order (the same on every
    rank, since every rank builds the same model); stream 0 is data augmentation."""
    layers = [m for _, m in module.named_modules() if isinstance(m, SampleDropout)]
    for i, layer in enumerate(layers):
        layer.stream = AUGMENT_STREAM + 1 + i
    return module


_CHANNELWISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def convert_dropout(module: nn.Module) -> nn.Module:
    """Replace torch's ``nn.Dropout`` (and ``Dropout1d/2d/3d``) layers in ``module`` (itself included) by
    :class:`SampleDropout` with the same p, then number the streams. Like ``convert_sync_batchnorm``.

    Not converted: ``AlphaDropout`` / ``FeatureAlphaDropout``, and ``torch.nn.functional.dropout`` called in
    a forward; they still draw from the process's generator.
    """
    module = _convert(module)
    return assign_streams(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, _CHANNELWISE):
        return _replace(module, channelwise=True)
    if type(module) is nn.Dropout:
        return _replace(module, channelwise=False)
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module


def _replace(old: nn.Module, channelwise: bool) -> SampleDropout:
    new = SampleDropout(old.p, channelwise=channelwise)
    new.train(old.training)
    return new


__all__ = ["SampleKeys", "SampleDropout", "sample_keys", "replay_context", "random_bits", "uniform", "assign_streams", "convert_dropout", "mix32",
           "AUGMENT_STREAM"]

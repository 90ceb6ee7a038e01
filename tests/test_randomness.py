"""Per-sample randomness: every draw is a function of (seed, step, position in the global batch, stream, call),
so a sample gets the same dropout mask and augmentation whichever rank or micro-batch holds it."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from disttrain.config import DataConfig
from disttrain.data.augment import augment_images
from disttrain.data.dataset import build_dataset
from disttrain.data.loader import GlobalBatches
from disttrain.randomness import SampleDropout, SampleKeys, _mix32_, convert_dropout, mix32, random_bits, sample_keys, uniform


def keys(n: int, step: int = 0, seed: int = 0, start: int = 0) -> SampleKeys:
    return SampleKeys(seed, step, torch.arange(start, start + n))


def test_mix32_is_the_published_hash_in_exact_int64_arithmetic():
    def reference(x: int) -> int:  # [16 21f0aaad 15 735a2d97 15], as unsigned 32-bit C arithmetic
        x ^= x >> 16
        x = (x * 0x21F0AAAD) % 2**32
        x ^= x >> 15
        x = (x * 0x735A2D97) % 2**32
        return x ^ (x >> 15)

    rng = random.Random(1)
    values = [0, 1, 2, 0xFFFFFFFF, 0x80000000] + [rng.getrandbits(32) for _ in range(200)]
    expected = [reference(v) for v in values]
    assert mix32(torch.tensor(values)).tolist() == expected
    assert _mix32_(torch.tensor(values)).tolist() == expected
    assert [mix32(v) for v in values] == expected
    assert len(set(expected)) == len(set(values))


def test_uniform_rows_belong_to_samples():
    full = uniform(keys(12, step=3), stream=1, count=50)
    assert full.shape == (12, 50) and full.dtype == torch.float64
    assert 0 <= float(full.min()) and float(full.max()) < 1
    # Any subset of the samples, in any batch, gets the same rows: nothing depends on batch composition.
    part = uniform(SampleKeys(0, 3, torch.tensor([7, 2, 11])), stream=1, count=50)
    torch.testing.assert_close(part, full[[7, 2, 11]], rtol=0, atol=0)
    assert torch.equal(uniform(keys(12, step=3), 1, 50), full)  # deterministic
    for other in (uniform(keys(12, step=4), 1, 50), uniform(keys(12, step=3, seed=1), 1, 50),
                  uniform(keys(12, step=3), 2, 50), uniform(keys(12, step=3), 1, 50, call=1)):
        assert not torch.isclose(other, full).any()  # another step, seed, stream or call: other numbers
    assert len(set(full.flatten().tolist())) == full.numel()
    torch.testing.assert_close(full, random_bits(keys(12, step=3), 1, 50).double() / 2**32, rtol=0, atol=0)


def test_uniform_statistics():
    u = uniform(keys(64), stream=1, count=4096)
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.005
    assert abs(float((u >= 0.2).double().mean()) - 0.8) < 0.005
    neighbours = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    samples = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    assert abs(float(neighbours)) < 0.01 and abs(float(samples)) < 0.01


def _layers(p: float = 0.25) -> nn.Sequential:
    return convert_dropout(nn.Sequential(nn.Dropout(p), nn.Identity(), nn.Dropout(p)))


def test_sample_dropout_masks_are_per_sample_and_per_layer():
    model = _layers()
    x = torch.ones(10, 6, 50, dtype=torch.float64)
    with sample_keys(keys(10, step=2)):
        first = model[0](x)
        again = model[0](x)  # the same layer twice in one forward: a second, different draw
        other = model[2](x)
    kept = first != 0
    assert abs(float(kept.double().mean()) - 0.75) < 0.02
    assert torch.equal(first[kept], torch.full_like(first[kept], 1 / 0.75))  # scaled like nn.Dropout
    assert not torch.equal(first, again) and not torch.equal(first, other)
    # Split over two "micro-batches" with the same keys: the same masks.
    with sample_keys(keys(4, step=2)):
        head = model[0](x[:4])
    with sample_keys(keys(6, step=2, start=4)):
        tail = model[0](x[4:])
    assert torch.equal(torch.cat([head, tail]), first)


def test_sample_dropout_eval_identity_and_missing_keys():
    layer = _layers()[0]
    x = torch.randn(3, 4)
    layer.eval()
    assert layer(x) is x  # eval: the identity, with or without keys
    layer.train()
    with pytest.raises(RuntimeError, match=r"needs the keys of the batch's samples: run the forward inside "
                                           r"disttrain\.randomness\.sample_keys"):
        layer(x)
    with sample_keys(keys(2)), pytest.raises(RuntimeError, match="batch of 3 samples but keys for 2"):
        layer(x)
    assert SampleDropout(0.0)(x) is x
    with sample_keys(keys(3)), pytest.raises(RuntimeError, match="has no stream"):
        SampleDropout(0.5)(x)


def test_convert_dropout_replaces_torch_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Sequential(nn.Dropout2d(0.1), nn.AlphaDropout(0.2)))
    model = convert_dropout(model)
    assert isinstance(model[1], SampleDropout) and model[1].p == 0.3 and not model[1].channelwise
    assert isinstance(model[2][0], SampleDropout) and model[2][0].channelwise
    assert isinstance(model[2][1], nn.AlphaDropout)  # not converted (documented)
    assert [model[1].stream, model[2][0].stream] == [1, 2]
    x = torch.ones(5, 3, 4, 4)
    with sample_keys(keys(5)):
        y = model[2][0](x)
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))  # channelwise: one draw per sample and channel
    assert 0 < int((y == 0).sum()) < y.numel()


def test_augmentation_flip_and_crop():
    x = torch.arange(40 * 2 * 5 * 5, dtype=torch.float64).reshape(40, 2, 5, 5)
    k = keys(40, step=1)
    flipped = augment_images(x, k, "flip", 1)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 5 < int(mirrored.sum()) < 35
    padding = 2
    cropped = augment_images(x, k, "crop", padding)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = set()
    for i in range(40):  # each output is a 5x5 window of its zero-padded image
        match = [(a, b) for a in range(2 * padding + 1) for b in range(2 * padding + 1)
                 if torch.equal(cropped[i], padded[i, :, a:a + 5, b:b + 5])]
        assert match, i
        offsets.add(match[0])
    assert len(offsets) > 10
    both = augment_images(x, k, "flip_crop", padding)
    assert torch.equal(torch.where(mirrored[:, None, None, None], cropped.flip(-1), cropped), both)
    # Per sample: a subset of the samples is augmented exactly as in the whole batch.
    assert torch.equal(augment_images(x[10:17], k.select(slice(10, 17)), "flip_crop", padding), both[10:17])
    assert augment_images(x, k, "none", 1) is x


@pytest.mark.parametrize("W, k", [(3, 1), (2, 3)])
def test_rank_slices_and_micro_batches_see_the_single_device_batch(W, k):
    ds = build_dataset(DataConfig(num_samples=45, augment="flip_crop"), "cnn", seed=2, dtype=torch.float64)
    single = GlobalBatches(ds, 20, seed=2, rank=0, world_size=1)
    ranks = [GlobalBatches(ds, 20, seed=2, rank=r, world_size=W) for r in range(W)]
    cpu = torch.device("cpu")
    for step in (0, 2):  # step 2 wraps the epoch
        x1, y1, k1 = single.keyed_batch(step, cpu)
        micro = [m for b in ranks for m in b.keyed_micro_batches(step, cpu, k)]
        assert torch.equal(torch.cat([m[0] for m in micro]), x1) and torch.equal(torch.cat([m[1] for m in micro]), y1)
        assert torch.equal(torch.cat([m[2].positions for m in micro]), torch.arange(20))
        assert all(m[2].step == step for m in micro)
    plain = GlobalBatches(build_dataset(DataConfig(num_samples=45), "cnn", 2, torch.float64), 20, 2, 0, 1)
    assert not torch.equal(plain.batch(0, cpu)[0], single.batch(0, cpu)[0])  # augmentation changed the images

"""Padded token sequences for the language-model benchmarks (``bench step --model gpt``): a data factory.

``padded_sequences(num_samples, seed, seq_len, vocab)`` returns token ids x (N, T) and next-token targets y (N, T)
for sequences of seeded random length 1 to T, right-padded (input 0, target -100), so the number of targets differs
per sequence, per rank and per step, as with documents cut into chunks. In memory: the benchmark times the step,
not the reading.
"""

from __future__ import annotations

import numpy as np


def padded_sequences(num_samples: int, seed: int, seq_len: int = 64, vocab: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 24])
    tokens = rng.integers(0, vocab, (num_samples, seq_len + 1))
    lengths = rng.integers(1, seq_len + 1, num_samples)
    position = np.arange(seq_len)[None, :]
    inside = position < lengths[:, None]
    return np.where(inside, tokens[:, :-1], 0), np.where(inside, tokens[:, 1:], -100)


__all__ = ["padded_sequences"]

"""A Hugging Face model and dataset as they are: transformers' ``GPT2LMHeadModel`` (unwrapped) on a dataset of dicts.

    data:  {name: "examples.hf_gpt2:counting", num_samples: 512, num_classes: 64}
    model: {name: "examples.hf_gpt2:gpt2", kwargs: {layers: 2, width: 32, heads: 2}}
    train: {loss: causal_lm}

``gpt2`` builds the model from a ``GPT2Config`` (no download: random weights, seeded by disttrain). Its output is a
``CausalLMOutputWithCrossAttentions``: disttrain reads ``.logits``. ``counting`` returns items the way a tokenized
``datasets.Dataset`` with ``set_format("torch")`` does, ``{"input_ids", "attention_mask", "labels"}`` with
``labels = input_ids`` (Hugging Face's convention: the loss shifts them), of different lengths (disttrain pads them
on the right: disttrain/data/named.py).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def gpt2(input_shape: tuple[int, ...], num_classes: int, layers: int = 2, width: int = 32, heads: int = 2,
         context: int = 64, **config) -> GPT2LMHeadModel:
    """A GPT-2 with vocabulary ``num_classes`` (data.num_classes); ``config``: any other ``GPT2Config`` key, e.g.
    ``attn_pdrop`` (attention dropout, 0.1 by default in GPT-2: see docs/language-models.md)."""
    return GPT2LMHeadModel(GPT2Config(vocab_size=num_classes, n_positions=context, n_embd=width, n_layer=layers,
                                      n_head=heads, **{"bos_token_id": None, "eos_token_id": None, **config}))


class Counting:
    """Counting sequences mod ``vocab``: a random start and stride, a random length in [min_len, max_len]. The next
    token follows from the two before it, so the loss falls as the model learns to count."""

    def __init__(self, num_samples: int, seed: int, vocab: int, min_len: int, max_len: int):
        rng = np.random.default_rng(seed)
        self.starts = rng.integers(0, vocab, num_samples)
        self.strides = rng.integers(1, 4, num_samples)
        self.lengths = rng.integers(min_len, max_len + 1, num_samples)
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (self.starts[i] + self.strides[i] * torch.arange(int(self.lengths[i]))) % self.vocab
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def counting(num_samples: int, seed: int, vocab: int = 64, min_len: int = 8, max_len: int = 24) -> Counting:
    """The data factory: ``num_samples`` dict items of token ids below ``vocab`` (data.num_classes)."""
    return Counting(num_samples, seed, vocab, min_len, max_len)


def counting_dataset(num_samples: int, seed: int, vocab: int = 64, min_len: int = 8, max_len: int = 24):
    """The same items as a ``datasets.Dataset`` in torch format, what a tokenized Hugging Face dataset is
    (``data.name: "examples.hf_gpt2:counting_dataset"``; needs the ``datasets`` package)."""
    from datasets import Dataset

    data = counting(num_samples, seed, vocab, min_len, max_len)
    rows = [data[i] for i in range(len(data))]
    columns = {key: [row[key].tolist() for row in rows] for key in ("input_ids", "attention_mask", "labels")}
    return Dataset.from_dict(columns).with_format("torch")

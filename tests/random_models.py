"""Users' models that draw random numbers, by module or by function, for the tests of verify/draws.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GPT2Logits(nn.Module):
    """A Hugging Face GPT-2 wrapped to return its ``.logits`` (docs/language-models.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def gpt2(input_shape, num_classes, width=32, layers=2, **dropout):
    """A tiny GPT2LMHeadModel with GPT2Config's default dropout (0.1 on attention, residuals and embeddings) unless
    ``dropout`` sets a key (attn_pdrop, resid_pdrop, embd_pdrop)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=num_classes, n_positions=input_shape[0], n_embd=width, n_layer=layers, n_head=2,
                     bos_token_id=0, eos_token_id=0, **dropout)
    return GPT2Logits(GPT2LMHeadModel(cfg))


class FunctionalDropout(nn.Module):
    """An MLP whose hidden layer drops out with ``F.dropout``: a functional draw from the process generator."""

    def __init__(self, features: int, num_classes: int, p: float):
        super().__init__()
        self.hidden, self.out, self.p = nn.Linear(features, 16), nn.Linear(16, num_classes), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.dropout(torch.relu(self.hidden(x.flatten(1))), self.p, self.training))


class NoisyInput(nn.Module):
    """An MLP that adds ``torch.rand`` noise to its input in training: a draw made by no submodule."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.body(x + 0.01 * torch.rand_like(x) if self.training else x)


def _features(input_shape) -> int:
    n = 1
    for s in input_shape:
        n *= s
    return n


def functional_dropout(input_shape, num_classes, p=0.2):
    return FunctionalDropout(_features(input_shape), num_classes, p)


def noisy_input(input_shape, num_classes):
    return NoisyInput(_features(input_shape), num_classes)

"""The built-in gpt: a small causal transformer language model (nanoGPT's shape) for ``train.loss:
token_cross_entropy``.

Token and position embeddings -> ``layers`` pre-norm blocks (LayerNorm -> causal self-attention with
torch's ``scaled_dot_product_attention`` -> residual; LayerNorm -> MLP of width 4 * ``model.hidden`` -> residual)
-> LayerNorm -> a head to the vocabulary, tied to the token embedding by default (``tie_head``). Inputs are
token ids (N, T), outputs logits (N, T, V).

The blocks (``self.blocks``, an nn.ModuleList) are the units of ``comm.impl: fsdp`` and ``model.recompute``
(parallel/blocks.py); the embeddings, the final norm and the head belong to the root. Options in ``model.kwargs``
(:data:`OPTIONS`): ``layers``, ``heads``, ``context`` (position embeddings; 0: the inputs' length, ``data.seq_len``)
and ``tie_head``; the width is ``model.hidden``. Dropout
(``model.dropout``) is per-sample and keyed (randomness.py) on the embeddings' sum and each residual branch;
attention weights are not dropped (SDPA's dropout draws from the process's generator, which would differ per rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ModelConfig
from ..errors import ConfigError
from .layers import dropout_layers


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        # No bias: a key bias adds q.b to every score of a query alike, which softmax cancels, so its gradient is
        # rounding noise, and Adam would turn that noise into full-size, run-dependent steps.
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.drop1 = nn.Sequential(*dropout_layers(dropout))
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 *dropout_layers(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, context: int, width: int, layers: int, heads: int, tie_head: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context, width)
        self.drop = nn.Sequential(*dropout_layers(dropout))
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(_init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / (2 * layers) ** 0.5)
        if tie_head:
            self.head.weight = self.token_embedding.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"a sequence of {t} tokens exceeds the model's context of {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


OPTIONS = {"layers": 2, "heads": 2, "context": 0, "tie_head": True}  # model.kwargs of the gpt, and their defaults


def options(cfg: ModelConfig) -> dict:
    """The gpt's ``model.kwargs`` over :data:`OPTIONS`, checked: one ConfigError line per problem."""
    unknown = sorted(set(cfg.kwargs) - OPTIONS.keys())
    if unknown:
        raise ConfigError(f"model.kwargs: unknown option {', '.join(unknown)} of model.name=gpt (it takes "
                          f"{', '.join(OPTIONS)})")
    opts = {**OPTIONS, **cfg.kwargs}
    for key, low in (("layers", 1), ("heads", 1), ("context", 0)):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"model.kwargs.{key}: must be an integer >= {low}, got {value!r}")
    if not isinstance(opts["tie_head"], bool):
        raise ConfigError(f"model.kwargs.tie_head: must be true or false, got {opts['tie_head']!r}")
    if cfg.hidden % opts["heads"]:
        raise ConfigError(f"model.kwargs.heads={opts['heads']} does not divide model.hidden={cfg.hidden}")
    return opts


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``input_shape`` (T,): token ids of length T (data.seq_len); ``num_classes``: the vocabulary size V."""
    opts = options(cfg)
    if len(input_shape) != 1:
        raise ConfigError(f"model.name=gpt takes token ids (N, T); the data's inputs have shape (N, "
                          f"{', '.join(map(str, input_shape))})")
    if opts["context"] and input_shape[0] > opts["context"]:
        raise ConfigError(f"data.seq_len={input_shape[0]} exceeds the gpt's context (model.kwargs.context="
                          f"{opts['context']}): it has no position embedding beyond it (raise the context, or set it "
                          "to 0 to follow the data)")
    return GPT(num_classes, opts["context"] or input_shape[0], cfg.hidden, opts["layers"], opts["heads"],
               opts["tie_head"], cfg.dropout)


__all__ = ["GPT", "OPTIONS", "options", "build"]

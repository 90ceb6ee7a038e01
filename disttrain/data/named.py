"""Named inputs: a batch that the model takes by keyword, ``model(input_ids=..., attention_mask=...)``, as Hugging
Face models do, and the collation of a dataset whose items are dicts.

A dataset item ``{"input_ids": (T,), "labels": (T,) or (), "attention_mask": (T,)}`` (what ``datasets`` and every
Hugging Face example produce; ``attention_mask`` optional) becomes, for a batch of n items, the inputs
:class:`NamedInputs` ``{"input_ids": (n, T), "attention_mask": (n, T)}`` and the targets ``labels``. Other keys of
an item are not passed to the model.

**Padding.** Items of different lengths are padded on the right to the longest of the batch that is read: input ids
with 0, attention mask with 0, labels with -100 (no target). A rank reads only its slice of the global batch, so how
far a sequence is padded depends on how the batch is split across ranks. For a causal language model with right
padding the loss and every gradient do not: a real token attends only to the tokens before it (never to padding),
padded positions carry no target, and a position's embedding does not depend on the length after it; what changes is
only how many exact zeros a softmax and a matmul add (tests/test_huggingface.py: the same samples padded to
two lengths, float64: the summed loss 1.2e-16 apart, every gradient within 8.3e-16 of its largest entry; and a W=3
verify against one process). Padding needs the mask: items of
different lengths without an ``attention_mask`` are refused. Per-sample dropout (randomness.py) on (n, T, C)
activations draws the same mask at any padded length (element (t, c) is counter t * C + c); on attention weights
(n, H, T, T) it would not, which is one more reason to set attention dropout to 0 (docs/language-models.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100  # a padded label: no target (torch's and Hugging Face's ignore_index)
INPUT_KEYS = ("input_ids", "attention_mask")  # the item keys passed to the model, in this order
PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


class NamedInputs(dict):
    """The named input tensors of one batch, each (n, ...) over the same n samples. Indexing by a name returns that
    tensor; by anything else (a slice, an index tensor) the NamedInputs of those samples, so a batch is sliced into
    rank parts and micro-batches like a tensor (data/loader.py split)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return NamedInputs({name: value[key] for name, value in self.items()})

    def to(self, *args: Any, **kwargs: Any) -> NamedInputs:
        return NamedInputs({name: value.to(*args, **kwargs) for name, value in self.items()})

    def pin_memory(self) -> NamedInputs:
        return NamedInputs({name: value.pin_memory() for name, value in self.items()})

    @property
    def device(self) -> torch.device:
        return self["input_ids"].device

    @property
    def shape(self) -> torch.Size:
        """The shape of ``input_ids``: (n, T)."""
        return self["input_ids"].shape

    def dim(self) -> int:
        return self["input_ids"].dim()

    def __len__(self) -> int:  # the samples, as for a tensor (the names: len(self.keys()))
        return len(self["input_ids"])


def concat(parts: Sequence[Any]) -> Any:
    """``torch.cat`` of input batches along the samples: tensors, or NamedInputs name by name (padded alike: parts
    of one fetched batch)."""
    if isinstance(parts[0], NamedInputs):
        return NamedInputs({name: torch.cat([p[name] for p in parts]) for name in parts[0].keys()})
    return torch.cat(list(parts))


class CollateError(ValueError):
    """A dict item that cannot join a batch; the message is one line, completed by the caller (which names the
    factory)."""


def collate(items: Sequence[Mapping], indices: Sequence[int]) -> tuple[NamedInputs, torch.Tensor]:
    """The inputs and labels of dict ``items`` (dataset indices ``indices``), padded on the right to the longest."""
    first = items[0]
    for key in ("input_ids", "labels"):
        if key not in first:
            raise CollateError(f"item {indices[0]} has no {key!r} (its keys: {', '.join(map(str, first))}); a dict "
                               "item needs 'input_ids' and 'labels', and may have 'attention_mask'")
    names = [k for k in INPUT_KEYS if k in first]
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in (*names, "labels")}
    for i, item in zip(indices, items):
        if [k for k in INPUT_KEYS if k in item] != names:
            raise CollateError(f"item {i} has the inputs {', '.join(k for k in INPUT_KEYS if k in item)}, item "
                               f"{indices[0]} has {', '.join(names)}; every item needs the same")
        for key in columns:
            value = torch.as_tensor(item[key])
            if key != "labels" and value.dim() != 1:
                raise CollateError(f"item {i}: {key!r} has shape {tuple(value.shape)}; expected one id per token (T,)")
            columns[key].append(value)
    lengths = [len(t) for t in columns["input_ids"]]
    for key, values in columns.items():
        for i, t, n in zip(indices, values, lengths):
            if (key != "labels" or t.dim() > 0) and t.shape != (n,):
                raise CollateError(f"item {i}: {key!r} has shape {tuple(t.shape)} and 'input_ids' {(n,)}; expected "
                                   "one value per token" + (" (or one label per item)" if key == "labels" else ""))
    if len(set(lengths)) > 1 and "attention_mask" not in names:
        raise CollateError(f"items {indices[lengths.index(min(lengths))]} and {indices[lengths.index(max(lengths))]} "
                           f"have {min(lengths)} and {max(lengths)} tokens and no 'attention_mask': padding them to "
                           "one length needs it (1 for a token, 0 for padding)")
    longest = max(lengths)

    def stacked(key: str) -> torch.Tensor:
        values = columns[key]
        if values[0].dim() == 0:  # one label per item (a sequence classifier)
            return torch.stack(values)
        out = torch.full((len(values), longest), PAD_VALUES[key], dtype=values[0].dtype)
        for row, t in zip(out, values):
            row[: len(t)] = t
        return out

    return NamedInputs({k: stacked(k) for k in names}), stacked("labels")


__all__ = ["NamedInputs", "INPUT_KEYS", "PAD_VALUES", "concat", "collate", "CollateError"]

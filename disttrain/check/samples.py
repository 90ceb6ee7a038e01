"""Samples as the check sees them: the rows of a training forward's inputs, hashed (the data the ranks saw, a
multiset per step), and a batch's rows put in another order (the rounding twins)."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any


def fingerprints(args: tuple, kwargs: dict) -> list[str]:
    """One hash per sample (row) of a forward's inputs: every tensor with the most common leading size, each
    row cut to the positions an ``attention_mask`` of the same shape marks."""
    import torch

    tensors = [(key, t) for key, t in _named_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        return []
    n = Counter(t.shape[0] for _, t in tensors).most_common(1)[0][0]
    tensors = [(key, t.detach().cpu()) for key, t in tensors if t.shape[0] == n]
    mask = kwargs.get("attention_mask")
    mask = mask.detach().cpu().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=10)
        for key, t in tensors:
            row = t[i]
            if mask is not None and t.shape[:2] == mask.shape:
                row = row[mask[i]]
            h.update(key.encode() + str(row.dtype).encode())
            h.update(row.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def _named_leaves(obj: Any, key: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__") and not hasattr(obj, "dim")):
        return [leaf for k in sorted(obj.keys(), key=str) for leaf in _named_leaves(obj[k], f"{key}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _named_leaves(v, f"{key}/{i}")]
    return [(key, obj)]


def leaves(obj: Any) -> list[Any]:
    return [v for _, v in _named_leaves(obj)]


def apply_rows(obj: Any, fn: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__setitem__")):
        for k in list(obj.keys()):
            obj[k] = apply_rows(obj[k], fn)
        return obj
    if isinstance(obj, list):
        return [apply_rows(v, fn) for v in obj]
    if isinstance(obj, tuple):
        items = [apply_rows(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


__all__ = ["fingerprints", "leaves", "apply_rows"]

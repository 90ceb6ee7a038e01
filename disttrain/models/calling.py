"""How any model is called on a batch, and where its logits are in what it returns.

A batch's inputs are a tensor, called ``model(x)``, or named inputs (a dataset of dicts, data/named.py), called by
name, ``model(input_ids=..., attention_mask=...)``, as Hugging Face models are. The output is the logits, or anything
that carries them as ``.logits`` (a transformers ``ModelOutput``, any object with the attribute) or ``["logits"]``
(a dict): such a model needs no wrapper. The labels are never passed: the model's own loss is not disttrain's
(run/loss.py says what the step's loss is divided by, and why a per-batch mean is not it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..data.named import NamedInputs


def call_model(model: Any, x: torch.Tensor | NamedInputs) -> Any:
    """The model on a batch: ``model(**x)`` for named inputs, ``model(x)`` for a tensor."""
    return model(**x) if isinstance(x, NamedInputs) else model(x)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor itself, ``output.logits`` or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, which is neither a tensor nor carries a tensor "
                        "'logits' (attribute or key)")
    return logits


__all__ = ["call_model", "logits_of"]

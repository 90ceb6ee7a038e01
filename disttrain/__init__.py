"""disttrain: data-parallel PyTorch training that proves a W-process run equals one device on the global batch.

The public API: the exact parts of disttrain's trainer, for training loops of one's own (docs/own-loop.md), and
``disttrain.testing`` to prove such a loop equal to one device in a test. A thin facade: each name is the
trainer's own function, imported on first use, so ``import disttrain`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it (the one implementation, which the trainer uses too)
_API = {
    "GlobalBatchSampler": "disttrain.data.sampler",
    "register_sum_hook": "disttrain.parallel.ddp",
    "global_count": "disttrain.parallel.collectives",
    "clip_grad_norm_": "disttrain.optim.clip",
    "lr_at": "disttrain.optim.schedule",
    "warmup_schedule": "disttrain.optim.schedule",
    "SyncBatchNorm": "disttrain.parallel.syncbn",
    "convert_sync_batchnorm": "disttrain.parallel.syncbn",
    "convert_dropout": "disttrain.randomness",
    "sample_keys": "disttrain.randomness",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'disttrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

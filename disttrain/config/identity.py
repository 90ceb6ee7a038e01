"""Run identity: which config keys change the trajectory a run computes, and which only how it executes.

Two runs compute the same trajectory (and may be compared by ``verify --against``, or one resumed from the
other's checkpoint) when their configs agree on every key outside :data:`EXECUTION_KEYS`.
"""

from __future__ import annotations

from typing import Any

from .schema import Config

# Keys that change where, on what and how a run executes or reports, never the trajectory it computes: they may
# differ between a run and its resumption, and between a run and what `verify --against` compares it with.
# (comm.impl and comm.bucket_mb regroup the same sums; the device changes rounding, not the mathematics.)
# data.workers and data.prefetch change who reads a batch and when, never which samples or how they are augmented.
# comm.reshard_after_forward changes when parameters are gathered; model.recompute computes the same activations
# twice (bitwise the same result, tests/test_fsdp.py). train.compile fuses the same operations (a rounding change,
# as the device; float64 matches to 1e-10, tests/test_compile.py). The checkpoint format and whether it is written
# in the background change how the state at a step is stored, never the state (tests/test_checkpoint_sharded.py).
EXECUTION_KEYS = frozenset({"train.out_dir", "train.log_every", "train.device", "comm.timeout_s", "comm.impl",
                            "comm.bucket_mb", "train.checkpoint_every", "train.keep_checkpoints", "train.checkpoint_format",
                            "train.checkpoint_async", "data.workers",
                            "data.prefetch", "train.tensorboard", "comm.reshard_after_forward",
                            "model.recompute", "train.deterministic", "comm.force_collectives", "train.compile"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 3}} -> {"train.steps": 3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trajectory_differences(ours: dict[str, Any], theirs: dict[str, Any], also_allowed: frozenset[str] = frozenset()
                           ) -> list[str]:
    """The dotted keys of two config dicts that differ and would change the training trajectory.

    A key that one of them lacks (a run written before the key existed) counts as its default: that run computed
    what the default computes, so a checkpoint outlives the addition of keys to the config."""
    defaults = flatten(Config().to_dict())
    a, b = {**defaults, **flatten(ours)}, {**defaults, **flatten(theirs)}
    allowed = EXECUTION_KEYS | also_allowed
    return sorted(k for k in a.keys() | b.keys() if k not in allowed and a.get(k) != b.get(k))


def continuation_keys(cfg: Any) -> frozenset[str]:
    """Trajectory keys that may still differ between a run and one that continues it (a resume, a step-wise
    segment): train.steps, unless the schedule's decay depends on it (cosine, linear and poly end at train.steps,
    so it moves every lr)."""
    return frozenset() if cfg.schedule.decay in ("cosine", "linear", "poly") else frozenset({"train.steps"})


__all__ = ["EXECUTION_KEYS", "flatten", "trajectory_differences", "continuation_keys"]

"""Which checkpoint a run continues from, decided once for the whole group.

A run continues from a checkpoint when asked (``--resume``, a path) or when torch's elastic agent restarted its
worker group. Rank 0 picks the file, reads it and checks that it was trained with the same trajectory; the
other ranks receive its decision (the step and config, or the error) in one broadcast, so no rank is left
waiting in a collective that another has left. The model and optimizer tensors stay on rank 0 here: the
gradient strategy distributes them (comm.GradSync.load_state_dict). A sharded checkpoint is decided on the same
way from its marker, and then every rank reads its own part of the tensors (:func:`load_training_state`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .format import CheckpointError, checkpoint_dir, newest_readable, read_resumable
from .sharded import load_sharded, saved_shapes
from ..config.schema import Config
from ..parallel.env import DistEnv, restart_count
from ..parallel.collectives import broadcast_from_main
from ..parallel.sync import GradSync, check_model_state
from ..errors import ConfigError
from ..config.identity import continuation_keys, trajectory_differences

TENSOR_KEYS = ("model", "optimizer")  # distributed by the strategy, not broadcast with the decision


def resume_state(cfg: Config, env: DistEnv, resume: bool | str | Path, allow: frozenset[str] = frozenset()
                 ) -> dict[str, Any] | None:
    """The checkpoint this run continues from; None for a fresh start (the same answer on every rank).

    ``resume``: True for the newest readable checkpoint in train.out_dir, a path for that file, False for a
    fresh start unless torch's elastic agent restarted this worker group (then, like True, but a group that
    failed before its first checkpoint starts over). Rank 0's answer holds the whole checkpoint; the others'
    lacks the model and optimizer tensors. ``allow``: see :func:`check_resumable`.
    """
    # Rank 0 alone decides, and every rank of a group takes part in the broadcast of its decision: ranks can see
    # different restart counts (a node that joins a restarted group starts at 0), and a rank that skipped the
    # broadcast on its own would leave the others waiting in it.
    state, error = None, None
    if env.is_main:
        restarted = restart_count() > 0
        try:
            state = _read(cfg, resume, restarted, allow) if resume or restarted else None
        except ConfigError as exc:
            error = str(exc)
    if not env.is_distributed:
        if error:
            raise ConfigError(error)
        return state
    decision = None if state is None else {k: v for k, v in state.items() if k not in TENSOR_KEYS}
    decision, error = broadcast_from_main((decision, error), env)
    if error:
        raise ConfigError(error)
    return state if env.is_main else decision


def _read(cfg: Config, resume: bool | str | Path, restarted: bool, allow: frozenset[str]) -> dict | None:
    out_dir = Path(cfg.train.out_dir)
    if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
        try:
            state = read_resumable(resume)
        except (FileNotFoundError, CheckpointError) as exc:
            raise ConfigError(str(exc)) from None
    else:
        state = newest_readable(out_dir, warn=lambda line: print(f"disttrain: {line}", file=sys.stderr, flush=True))
        if state is None:
            if not resume:  # restarted before any checkpoint was written: start over
                return None
            raise ConfigError(f"--resume: no readable checkpoint in {checkpoint_dir(out_dir)}")
    check_resumable(cfg, state, allow)
    return state


def check_resumable(cfg: Config, state: dict, allow: frozenset[str] = frozenset()) -> None:
    """Refuse a checkpoint whose run computed a different trajectory (one line naming the keys).

    ``allow``: trajectory keys that may differ all the same, on purpose (a float64 reference continuing a
    float32 checkpoint: {"train.dtype"}; load_state_dict casts the tensors).
    """
    differ = trajectory_differences(cfg.to_dict(), state["config"], allow | continuation_keys(cfg))
    if differ:
        raise ConfigError(f"cannot resume from step {state['step']}: the checkpoint was trained with a different "
                          f"config ({', '.join(differ)} differ); these keys change the trajectory")
    if state["step"] > cfg.train.steps:
        raise ConfigError(f"cannot resume from step {state['step']}: train.steps={cfg.train.steps} is smaller")


def load_training_state(sync: GradSync, optimizer: Any, state: dict[str, Any], is_main: bool) -> None:
    """Load the model and optimizer of ``state`` (from :func:`resume_state`) on every rank.

    Full: rank 0 holds the tensors and the strategy distributes them. Sharded (``state["path"]``, on every rank):
    every rank checks the saved shapes against the model from DCP's metadata (the same answer everywhere: a
    checkpoint of another model is refused in one line by all ranks, before any collective), then DCP reads each
    rank's part, resharded to this world size and strategy."""
    path = state.get("path")
    if path is None:
        sync.load_state_dict({k: state[k] for k in TENSOR_KEYS} if is_main else None, optimizer)
        return
    try:
        shapes = saved_shapes(path)
    except Exception as exc:  # an unreadable .metadata: the same on every rank
        raise ConfigError(f"{path}: unreadable DCP metadata ({type(exc).__name__})") from None
    error = check_model_state(sync.model, {k: _Shape(v) for k, v in shapes.items()})
    if error:
        raise ConfigError(f"{path}: {error}")
    load_sharded(sync.model, optimizer, path)


class _Shape:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


__all__ = ["resume_state", "check_resumable", "load_training_state"]

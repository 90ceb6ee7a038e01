"""The checkpoint format: the final model, and resumable training state, their names and how they are read.

``final.pt`` (every run, at the end):

    {"model": state_dict, "step": int, "config": dict, "world_size": int}

``checkpoints/step_{s:08d}.pt`` (every ``train.checkpoint_every`` optimizer steps and at the end), everything
the rest of the trajectory depends on after s completed optimizer steps:

    {"format": 1, "step": s, "model": state_dict (parameters and buffers: SyncBN running statistics),
     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "skipped": int,
     "config": dict, "world_size": int, "scaler": {"scale": float, "growth_tracker": int}}

("scaler": the fp16 loss scale, precision.py; the same on every rank. A checkpoint without it resumes with the
initial scale.)

The data needs no state: the global batch of step k is a pure function of (seed, k), and so is any
per-sample randomness. Nor does the world size enter the trajectory, so a checkpoint written by W ranks
resumes on any other number of ranks. All files load with ``torch.load(path, weights_only=True)``.

Every file is written atomically (files.py); writer.py decides when a checkpoint is due and writes it in the
background; resume.py decides where a run continues. The sharded format (``train.checkpoint_format: sharded``, a
directory per step written by every rank through torch's DCP) is sharded.py; :func:`load_checkpoint` reads either
into the layout above, and layout.py names and lists both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_save
from .layout import (CHECKPOINT_DIR, FORMAT, MARKER, CheckpointError, checkpoint_at, checkpoint_dir,
                     checkpoint_path, is_sharded, list_checkpoints, prune, remove_checkpoint, sharded_path, writing)
from .sharded import load_whole, read_manifest


def save_final(path: str | Path, model: nn.Module | dict[str, torch.Tensor], step: int, config: dict[str, Any],
               world_size: int) -> None:
    """Write final.pt: ``model`` is a module or its state_dict."""
    state = {k: v.detach().cpu() for k, v in (model.state_dict() if isinstance(model, nn.Module) else model).items()}
    with writing(path, Path(path).parent):
        atomic_save({"model": state, "step": int(step), "config": config, "world_size": int(world_size)}, path)


def load_final(path: str | Path) -> dict[str, Any]:
    """Read a final.pt; a missing or unreadable file raises FileNotFoundError / CheckpointError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _load(path)
    if not isinstance(state, dict) or not {"model", "config", "world_size"} <= state.keys():
        raise CheckpointError(f"{path}: not a disttrain final.pt (expected model, config, world_size)")
    return state


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, disallowed globals: all mean "not readable"
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable, truncated or not a torch file ({reason[:120]})") from None


def training_state(model_and_optimizer: dict[str, Any], scheduler: Any, step: int, skipped: int,
                   config: dict[str, Any], world_size: int, scaler: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resumable state after ``step`` completed optimizer steps: ``model_and_optimizer`` as the gradient
    strategy returns it on rank 0 (CPU copies: comm.GradSync.state_dict), and the rest."""
    state = {"format": FORMAT, "step": int(step), "model": model_and_optimizer["model"],
             "optimizer": model_and_optimizer["optimizer"], "scheduler": dict(scheduler.state_dict()),
             "skipped": int(skipped), "config": config, "world_size": int(world_size)}
    if scaler is not None:
        state["scaler"] = dict(scaler)
    return state


def save_checkpoint(out_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as checkpoints/step_{s}.pt, then delete all but the newest ``keep`` (0: none).

    Older files are removed only after the new one is durable, so a crash never leaves fewer good checkpoints.
    """
    path = checkpoint_path(out_dir, state["step"])
    with writing(path, out_dir):
        path.parent.mkdir(exist_ok=True)  # not out_dir itself: a vanished run directory is an error, not recreated
        atomic_save(state, path)
    prune(out_dir, keep)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one resumable checkpoint, whole; CheckpointError (one line) if it is not one. A sharded one is read in
    this process alone (sharded.load_whole) into the same layout."""
    path = Path(path)
    if is_sharded(path):
        return load_whole(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _load(path)
    needed = {"format", "step", "model", "optimizer", "scheduler", "skipped", "config", "world_size"}
    if not isinstance(state, dict) or not needed <= state.keys():
        raise CheckpointError(f"{path}: not a disttrain checkpoint (missing {', '.join(sorted(needed - set(state)))})"
                              if isinstance(state, dict) else f"{path}: not a disttrain checkpoint")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}, this disttrain reads {FORMAT}")
    return state


def read_resumable(path: str | Path) -> dict[str, Any]:
    """What a run resumes from: a full checkpoint whole (rank 0 distributes it), or a sharded one's marker with its
    ``path`` (every rank reads its own part: sharded.load_sharded)."""
    return read_manifest(path) if is_sharded(path) else load_checkpoint(path)


def newest_readable(out_dir: str | Path, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest checkpoint in ``out_dir`` that reads (:func:`read_resumable`); each unreadable newer one is
    reported through ``warn`` (one line naming it) and skipped. None when there is no readable checkpoint."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return read_resumable(path)
        except CheckpointError as exc:
            warn(f"skipping {exc}")
    return None


def clear_checkpoints(out_dir: str | Path) -> int:
    """Delete the checkpoints of an earlier run in ``out_dir`` (a fresh run must never resume from them)."""
    removed = 0
    for _, path in list_checkpoints(out_dir):
        remove_checkpoint(path)
        removed += 1
    directory = checkpoint_dir(out_dir)
    for leftover in directory.glob("step_*") if directory.is_dir() else ():  # unmarked sharded saves
        if leftover.is_dir():
            remove_checkpoint(leftover)
    return removed


__all__ = ["CHECKPOINT_DIR", "FORMAT", "MARKER", "CheckpointError", "checkpoint_at", "checkpoint_dir", "checkpoint_path",
           "sharded_path", "list_checkpoints", "writing", "save_final", "load_final", "training_state",
           "save_checkpoint", "load_checkpoint", "read_resumable", "newest_readable", "clear_checkpoints"]

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
background; resume.py decides where a run continues.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


from ..errors import StorageError
from .files import atomic_save


FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read as one; the message names the file."""


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


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:08d}.pt"


@contextlib.contextmanager
def writing(path: str | Path, out_dir: str | Path) -> Iterator[None]:
    """Writes to ``path`` inside fail with a :class:`StorageError` of one line: the file, the operating system's
    error, and the newest complete checkpoint of the run in ``out_dir`` (atomic writes leave it intact)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        found = list_checkpoints(out_dir)
        newest = f"newest complete checkpoint: {found[-1][1]}" if found else "no checkpoint was written"
        raise StorageError(f"cannot write {path}: {reason} (errno {exc.errno}); {newest}") from None


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in ``out_dir/checkpoints``, oldest first (unread)."""
    directory = checkpoint_dir(out_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


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
    if keep > 0:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one resumable checkpoint; CheckpointError (one line) if it is not one."""
    path = Path(path)
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


def newest_readable(out_dir: str | Path, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest checkpoint in ``out_dir`` that loads; each unreadable newer one is reported through ``warn``
    (one line naming it) and skipped. None when there is no readable checkpoint."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping {exc}")
    return None


def clear_checkpoints(out_dir: str | Path) -> int:
    """Delete the checkpoints of an earlier run in ``out_dir`` (a fresh run must never resume from them)."""
    removed = 0
    for _, path in list_checkpoints(out_dir):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed

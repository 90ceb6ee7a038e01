"""Atomic files: what the checkpoints, metrics and reports write with.

Atomic write: the bytes go to a temporary file in the same directory, which is flushed and fsynced, then
renamed over the final name (rename within one filesystem is atomic on POSIX), and the directory is
fsynced so the rename itself survives a crash. A kill at any instant leaves the old file or the new one,
never a torn one; an orphaned temporary file never matches ``step_*.pt``.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path
from typing import Any

import torch


def cpu_copy(state: Any) -> Any:
    """A copy of a (nested) state with every tensor detached on the CPU: loadable on any device."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` is always either the old file or the complete new one.

    The bytes are serialised in memory first and then written: a full disk is then the operating system's own
    error (OSError ENOSPC) rather than torch's zip writer failing mid-record ("unexpected pos")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # never matches step_*.pt
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(tmp, "xb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)

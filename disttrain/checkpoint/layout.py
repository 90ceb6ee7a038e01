"""Where checkpoints live in a run directory, for both formats, and which of them are complete.

    checkpoints/step_{s:08d}.pt    full: one file, written atomically by rank 0 (format.py)
    checkpoints/step_{s:08d}/      sharded: torch's DCP files of every rank (__R_0.distcp, .metadata), then
                                   disttrain.pt, written last by rank 0 once every rank's files are durable (sharded.py)

A sharded directory without ``disttrain.pt`` is a save that never finished (a kill, a full disk): it is not
listed, never resumed, and the next save of that step replaces it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import StorageError

FORMAT = 1  # the full format's version (format.py)
CHECKPOINT_DIR = "checkpoints"
MARKER = "disttrain.pt"  # a sharded checkpoint's own state (step, schedule, ...), and the mark that it is complete
_FILE = re.compile(r"^step_(\d{8,})\.pt$")
_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read as one; the message names the file."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:08d}.pt"


def sharded_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:08d}"


def checkpoint_at(out_dir: str | Path, step: int) -> Path:
    """The checkpoint of ``step`` in ``out_dir``: the complete sharded directory, else the full file (which may not
    exist)."""
    sharded = sharded_path(out_dir, step)
    return sharded if (sharded / MARKER).is_file() else checkpoint_path(out_dir, step)


def is_sharded(path: str | Path) -> bool:
    """A path names a sharded checkpoint (a directory, complete or not), not a full one (a file)."""
    return Path(path).is_dir()


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``out_dir/checkpoints``, oldest first (unread): full files and complete
    sharded directories. A step present in both formats lists the sharded one after the full one."""
    directory = checkpoint_dir(out_dir)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if (m := _FILE.match(p.name)) and p.is_file():
            found.append((int(m.group(1)), 0, p))
        elif (m := _DIR.match(p.name)) and (p / MARKER).is_file():
            found.append((int(m.group(1)), 1, p))
    return [(step, p) for step, _, p in sorted(found)]


def remove_checkpoint(path: Path) -> None:
    """Delete one checkpoint; a sharded one loses its marker first, so a crash halfway leaves no complete-looking
    directory with files missing."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
        else:
            path.unlink()


def prune(out_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0: all); called after a new one is durable, so a crash never leaves
    fewer good checkpoints."""
    if keep > 0:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            remove_checkpoint(old)


@contextlib.contextmanager
def writing(path: str | Path, out_dir: str | Path) -> Iterator[None]:
    """Writes to ``path`` inside fail with a :class:`StorageError` of one line: the file, the operating system's
    error, and the newest complete checkpoint of the run in ``out_dir`` (atomic writes leave it intact)."""
    try:
        yield
    except OSError as exc:
        raise storage_error(path, out_dir, exc) from None


def storage_error(path: str | Path, out_dir: str | Path, exc: OSError | str) -> StorageError:
    """One line: the path, the operating system's error (or ``exc``, a reason in words), the newest checkpoint."""
    reason = exc if isinstance(exc, str) else f"{exc.strerror or type(exc).__name__} (errno {exc.errno})"
    found = list_checkpoints(out_dir)
    newest = f"newest complete checkpoint: {found[-1][1]}" if found else "no checkpoint was written"
    return StorageError(f"cannot write {path}: {reason}; {newest}")

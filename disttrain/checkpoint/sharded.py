"""Sharded checkpoints: every rank writes what it holds through torch.distributed.checkpoint (DCP).

``checkpoints/step_{s:08d}/`` holds DCP's own files (FileSystemWriter: ``__R_0.distcp`` per rank, ``.metadata``
written by rank 0 after it has gathered every rank's write results) and then ``disttrain.pt`` (layout.MARKER),
written atomically by rank 0 last of all: a directory counts as a checkpoint only with it.

What each rank writes: ``torch.distributed.checkpoint.state_dict.get_state_dict`` of the model and optimizer, keyed
by parameter name. Under fsdp these are the rank's own DTensor shards of parameters, gradients' moments and the
rest, so no rank ever holds the whole state; under ddp/allreduce every rank holds the same whole tensors, and DCP's
planner writes each replicated tensor once, on one rank chosen to balance the bytes (dedup_save_plans), so the
state is written once, split over the ranks. Loading reshards: each rank reads the pieces of the saved chunks that
overlap what it holds now, for any world size and either strategy.

``disttrain.pt`` holds what is not a tensor: the step, the schedule, the fp16 scaler, the skipped-step count, the
config, the world size, the format version, and the name and size of every file of the directory (a missing rank's
file is then named before any rank reads). The data position needs no state of its own: the global batch of step s
and every sample's random stream are pure functions of (seed, s) (data/sampler.py, randomness.py), so "step" is
the position, for any world size and number of loader workers.

DCP's files are not promised to load in another torch version: :func:`load_whole` reads one into a single
process with no process group, and ``disttrain checkpoint export`` writes it as a final.pt.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from .files import atomic_save
from .layout import FORMAT, MARKER, CheckpointError, prune, remove_checkpoint, storage_error
from ..errors import StorageError
from ..parallel.collectives import wait_for_every_rank

SHARDED_FORMAT = 1
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} as this rank holds them (fsdp: DTensor shards; else whole tensors), keyed by
    parameter name. The live tensors, not copies."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def staged_copy(state: Any) -> Any:
    """A copy of every tensor (a DTensor stays a DTensor: its local shard is cloned, no communication).

    This is the staging of an asynchronous save, taken at the step: torch's async_save has written values that
    training changed after the call when the tensors were already on the CPU (pytorch #144657), the case of every
    gloo run, so the copy is made here, unconditionally, before the loop goes on."""
    if isinstance(state, DTensor):  # the shard, staged on the CPU as torch's stager does (metadata unchanged)
        return DTensor.from_local(_to_cpu(state.to_local()), state.device_mesh, state.placements, run_check=False,
                                  shape=state.shape, stride=state.stride())
    if isinstance(state, torch.Tensor):
        return _to_cpu(state)
    if isinstance(state, dict):
        return {k: staged_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [staged_copy(v) for v in state]
    return state


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def background_group(timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group of all ranks for saves written by a background thread: their collectives (DCP's plan and result
    gathers) then never interleave with the training loop's on the default group. None without a process group.
    Every rank creates it at the same point (the first asynchronous save)."""
    if not _grouped():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns on every save and load without a process group; here that is the intent (one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def release_group(group: dist.ProcessGroup | None) -> None:
    """Destroy a group made by :func:`background_group` once its last save is done (not a collective)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group(group)


def write_sharded(path: Path, state: dict[str, Any], manifest: dict[str, Any] | None, out_dir: Path, keep: int,
                  group: dist.ProcessGroup | None = None) -> None:
    """Every rank: write its part of ``state`` into ``path`` through DCP. Rank 0 (``manifest`` given) then writes
    the marker and prunes old checkpoints. Storage errors on any rank: a :class:`StorageError` of one line."""
    if manifest is not None and path.exists():
        # Leftovers of an interrupted save of this step, or a checkpoint of a run resumed from an earlier step.
        remove_checkpoint(path)
    # Every rank's FileSystemWriter creates ``path`` while it plans, before DCP's first collective: without this
    # barrier a rank ahead of rank 0 creates the directory that rank 0 then takes for leftovers and removes under
    # it (EEXIST from the other rank's mkdir). One barrier per save, on the save's own group.
    wait_for_every_rank(group)
    try:
        with _one_process_is_meant():
            dcp.save(state, storage_writer=FileSystemWriter(path), process_group=group, no_dist=not _grouped())
    except CheckpointException as exc:
        raise _one_line(exc, path, out_dir) from None
    except OSError as exc:
        raise storage_error(path, out_dir, exc) from None
    if manifest is None:
        return
    # DCP's save returned on rank 0 after every rank's write results were gathered: every file is complete
    # (FileSystemWriter fsyncs each one), so the marker may go down now.
    try:
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.name != MARKER}
        atomic_save({**manifest, "format": SHARDED_FORMAT, "files": files}, path / MARKER)
    except OSError as exc:
        raise storage_error(path / MARKER, out_dir, exc) from None
    prune(out_dir, keep)


def _one_line(exc: CheckpointException, path: Path, out_dir: Path) -> StorageError:
    failures = sorted(exc.failures.items())
    for rank, (error, _) in failures:
        if isinstance(error, OSError):
            return storage_error(getattr(error, "filename", None) or path, out_dir, error)
    # torch's zip writer reports a short write as "unexpected pos": on a full disk, say so.
    if _disk_full(path):
        return storage_error(path, out_dir, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    rank, (error, _) = failures[0]
    return storage_error(path, out_dir, f"rank {rank}: {_first_line(error)}")


def _disk_full(path: Path) -> bool:
    try:
        return os.statvfs(path if path.exists() else path.parent).f_bavail == 0
    except OSError:
        return False


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The marker of a sharded checkpoint, after checking that the directory is complete: CheckpointError (one line
    naming what is wrong) for an unmarked directory, a newer format, or a missing or truncated file of a rank."""
    path = Path(path)
    marker = path / MARKER
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete sharded checkpoint (no {MARKER}: its save never finished)")
    try:
        manifest = torch.load(marker, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign: "not readable"
        raise CheckpointError(f"{marker}: unreadable ({str(exc).strip().splitlines()[0][:120] if str(exc) else ''})"
                              ) from None
    if not isinstance(manifest, dict) or not {"format", "step", "files", "config", "world_size"} <= manifest.keys():
        raise CheckpointError(f"{marker}: not a disttrain sharded checkpoint marker")
    if manifest["format"] != SHARDED_FORMAT:
        raise CheckpointError(f"{path}: sharded checkpoint format {manifest['format']!r}, this disttrain reads "
                              f"{SHARDED_FORMAT} (written by a {'newer' if manifest['format'] > SHARDED_FORMAT else 'older'}"
                              " disttrain)")
    for name, size in manifest["files"].items():
        file = path / name
        owner = f"rank {m.group(1)}'s shard" if (m := _RANK_FILE.match(name)) else "DCP's metadata"
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing ({owner}); the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, {size} were written ({owner})")
    return {**manifest, "path": path}


def saved_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The whole shape of every model tensor in a sharded checkpoint, from DCP's metadata (nothing else read)."""
    metadata = FileSystemReader(path).read_metadata()
    return {key[len("model."):]: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and hasattr(meta, "size")}


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Every rank: read what it holds now from the sharded checkpoint ``path`` (resharding from any world size and
    either strategy) into ``model`` and ``optimizer``. DCP's load is collective over the default group."""
    state = sharded_state(model, optimizer)
    with _one_process_is_meant():
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=not _grouped())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_whole(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint in this process alone, with no process group: every tensor whole, in the full format's
    layout (format.py: the optimizer state keyed by parameter index)."""
    manifest = read_manifest(path)
    state: dict[str, Any] = {}
    try:
        with _one_process_is_meant():  # what format_utils.dcp_to_torch_save reads with: every key, whole
            _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                             no_dist=True)
    except (CheckpointException, Exception) as exc:  # noqa: B014 (CheckpointException is a BaseException)
        raise CheckpointError(f"{path}: unreadable DCP files ({_first_line(exc)})") from None
    names = [name for group in state["optimizer"]["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    optimizer = {"state": {index[k]: v for k, v in state["optimizer"].get("state", {}).items()},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                  for g in state["optimizer"]["param_groups"]]}
    whole = {k: v for k, v in manifest.items() if k not in ("files", "format")}
    return {**whole, "format": FORMAT, "model": state["model"], "optimizer": optimizer}


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = min(exc.failures.items())[1][0]
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def bytes_per_rank(manifest: dict[str, Any]) -> dict[int, int]:
    """Bytes of each rank's DCP file (rank 0's includes nothing else: .metadata and the marker are apart)."""
    out: dict[int, int] = {}
    for name, size in manifest["files"].items():
        if m := _RANK_FILE.match(name):
            out[int(m.group(1))] = out.get(int(m.group(1)), 0) + size
    return out


__all__ = ["SHARDED_FORMAT", "sharded_state", "staged_copy", "background_group", "release_group", "write_sharded", "read_manifest",
           "saved_shapes", "load_sharded", "load_whole", "bytes_per_rank"]

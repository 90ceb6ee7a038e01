"""``disttrain checkpoint export`` and ``disttrain checkpoint info``: a run's checkpoints read in one process, with
no process group.

Export writes the one-device state in final.pt's layout (``{"model", "step", "config", "world_size"}``, format.py),
or a ``.safetensors`` file of the model's tensors with the rest as its string metadata. DCP's files are not
promised to load in another torch version; an exported file is a plain torch.save (or safetensors) file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .format import load_checkpoint, save_final
from .layout import MARKER, CheckpointError, checkpoint_dir, list_checkpoints, sharded_path, writing
from .sharded import bytes_per_rank, read_manifest
from ..errors import ConfigError


def pick(run_dir: str | Path, step: int | None) -> Path:
    """The checkpoint of ``step`` in ``run_dir`` (None: the newest); one line naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    found = dict(list_checkpoints(run_dir))
    if step is None:
        if not found:
            raise ConfigError(f"{run_dir}: no complete checkpoint in {checkpoint_dir(run_dir)}")
        return found[max(found)]
    if step in found:
        return found[step]
    if sharded_path(run_dir, step).is_dir():  # named explicitly, so say why it is not one
        return sharded_path(run_dir, step)
    steps = ", ".join(map(str, sorted(found))) or "none"
    raise ConfigError(f"{run_dir}: no checkpoint of step {step} (complete checkpoints: {steps})")


def export(run_dir: str | Path, step: int | None, out: str | Path) -> str:
    """Write the model of a checkpoint as one file (final.pt layout, or .safetensors); the line to print."""
    path, out = pick(run_dir, step), Path(out)
    try:
        state = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(str(exc)) from None
    if out.suffix == ".safetensors":
        _save_safetensors(state, out)
    else:
        save_final(out, state["model"], state["step"], state["config"], state["world_size"])
    return f"{out}: the model of step {state['step']} ({path.name}, written by {state['world_size']} processes)"


def _save_safetensors(state: dict[str, Any], out: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError(f"{out}: writing .safetensors needs the safetensors package (pip install safetensors; "
                          "or name a .pt file)") from None
    tensors = {k: v.contiguous() for k, v in state["model"].items()}  # safetensors refuses views and shared storage
    metadata = {"step": str(state["step"]), "world_size": str(state["world_size"]),
                "config": json.dumps(state["config"])}
    with writing(out, out.parent):
        save_file(tensors, str(out), metadata=metadata)


def info(run_dir: str | Path) -> str:
    """One line per checkpoint of a run: step, format, world size, bytes per rank; then incomplete ones."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    lines = [f"{'step':>8}  {'format':<8}{'ranks':>6}  bytes per rank"]
    for step, path in list_checkpoints(run_dir):
        if path.is_dir():
            try:
                manifest = read_manifest(path)
            except CheckpointError as exc:
                lines.append(f"{step:>8}  {'sharded':<8}{'?':>6}  unusable: {exc}")
                continue
            per_rank = bytes_per_rank(manifest)
            sizes = " ".join(f"{per_rank.get(r, 0)}" for r in range(int(manifest["world_size"])))
            lines.append(f"{step:>8}  {'sharded':<8}{manifest['world_size']:>6}  {sizes} (torch "
                         f"{manifest.get('torch', '?')})")
        else:
            try:
                world_size = load_checkpoint(path)["world_size"]
            except CheckpointError:
                world_size = "?"
            lines.append(f"{step:>8}  {'full':<8}{world_size:>6}  {path.stat().st_size} (rank 0 only)")
    directory = checkpoint_dir(run_dir)
    for leftover in sorted(directory.glob("step_*")) if directory.is_dir() else ():
        if leftover.is_dir() and not (leftover / MARKER).is_file():
            lines.append(f"incomplete: {leftover.name} (no {MARKER}: a save that never finished; never resumed)")
    if len(lines) == 1:
        lines.append(f"no checkpoints in {directory}")
    return "\n".join(lines)


__all__ = ["export", "info", "pick"]

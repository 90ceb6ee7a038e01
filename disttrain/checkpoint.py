"""The final checkpoint, loadable with ``torch.load(path, weights_only=True)``:

    {"model": state_dict, "step": int, "config": dict, "world_size": int}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_final(path: str | Path, model: nn.Module, step: int, config: dict[str, Any], world_size: int) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state, "step": int(step), "config": config, "world_size": int(world_size)}, Path(path))


def load_final(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)

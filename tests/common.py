"""Helpers shared by the multi-process tests (module-level, so spawned pool workers can import them)."""

from __future__ import annotations

import functools
import socket

import torch

from disttrain.config import config_from_dict, load_config
from disttrain.parallel.env import distributed
from disttrain.run.train import run
from disttrain.verify.whole import relative_difference


def train_on_rank(cfg_dict: dict) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train ``cfg_dict`` on this rank (in a pool worker: the pool's group; else one process)."""
    cfg = config_from_dict(cfg_dict)
    with distributed("cpu", cfg.comm.timeout_s) as env:
        result = run(cfg, env, console=False)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}, result.losses


@functools.lru_cache(maxsize=None)
def reference(overrides: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The single-process run on the whole global batch (this process, no process group)."""
    return train_on_rank(load_config(None, list(overrides)).to_dict())


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest max|a-b| / max|b| over the floating-point tensors of two state_dicts."""
    assert a.keys() == b.keys()
    return max(relative_difference(a[k], b[k]) for k in b if b[k].is_floating_point())


def free_port() -> int:
    """A loopback port the OS reports free now (for torchrun's rendezvous endpoint in a test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""`disttrain train/verify --nproc N` outside torchrun: N local workers through torch's elastic launcher.

This is the same agent torchrun runs (torch.distributed.launcher.api), with a c10d rendezvous on a free
loopback port (port 0: the store picks it), no restarts, and workers started with spawn. Several runs (or
other tasks) can share one launched group, which pays the worker start-up (import torch) once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .config import Config, config_from_dict


class WorkerFailure(RuntimeError):
    """A worker process failed; the message names the rank and its exception in one line."""


Task = tuple[Callable[..., Any], tuple]  # (fn, args): fn(env, *args) runs on every rank


def _run_tasks(tasks: list[Task], device: str, timeout_s: float) -> list[Any]:
    # Runs in each spawned worker: the elastic agent has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*.
    # One process group for all tasks, in order: the processes start (import torch) once.
    from .dist import distributed

    with distributed(device, timeout_s) as env:
        return [fn(env, *args) for fn, args in tasks]


def _train_task(env: Any, cfg_dict: dict[str, Any], console: bool) -> list[float]:
    from .train import run

    return run(config_from_dict(cfg_dict), env, console=console).losses


def launch_local_tasks(tasks: list[Task], nproc: int, device: str = "auto", timeout_s: float = 300.0) -> list[Any]:
    """Run each task ``fn(env, *args)`` on ``nproc`` local workers, one after another in the same process
    group; return rank 0's results. ``fn`` must be importable (workers are spawned)."""
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"disttrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    try:
        results = elastic_launch(launch, _run_tasks)(tasks, device, timeout_s)
    except ChildFailedError as exc:
        raise WorkerFailure(_describe(exc)) from None
    return results[0]


def launch_local_runs(cfgs: list[Config], nproc: int, console: bool = True) -> list[list[float]]:
    """Train each config in turn with the same ``nproc`` local workers; return each run's per-step losses.

    The group is created once, with the first config's device and collective timeout.
    """
    tasks = [(_train_task, (cfg.to_dict(), console)) for cfg in cfgs]
    return launch_local_tasks(tasks, nproc, cfgs[0].train.device, cfgs[0].comm.timeout_s)


def launch_local(cfg: Config, nproc: int, console: bool = True) -> list[float]:
    """Train ``cfg`` with ``nproc`` local worker processes; return the per-step global losses.

    ``console``: rank 0 prints its per-step log lines (metrics.jsonl is written either way).
    """
    return launch_local_runs([cfg], nproc, console)[0]


def _describe(exc: ChildFailedError) -> str:
    parts = []
    for rank, failure in sorted(exc.failures.items()):
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        message = (message or f"exit code {failure.exitcode}").strip().splitlines()[-1]
        parts.append(f"rank {rank}: {message}")
    return "worker failed: " + "; ".join(parts)

"""`disttrain train/verify --nproc N` outside torchrun: N local workers through torch's elastic launcher.

This is the same agent torchrun runs (torch.distributed.launcher.api), with a c10d rendezvous on a free
loopback port (port 0: the store picks it), no restarts, and workers started with spawn.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .config import Config, config_from_dict


class WorkerFailure(RuntimeError):
    """A worker process failed; the message names the rank and its exception in one line."""


def _train_worker(cfg_dict: dict[str, Any], console: bool) -> list[float]:
    # Runs in each spawned worker: the elastic agent has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*.
    from .dist import distributed
    from .train import run

    cfg = config_from_dict(cfg_dict)
    with distributed(cfg.train.device, cfg.comm.timeout_s) as env:
        return run(cfg, env, console=console).losses


def launch_local(cfg: Config, nproc: int, console: bool = True) -> list[float]:
    """Train ``cfg`` with ``nproc`` local worker processes; return the per-step global losses.

    ``console``: rank 0 prints its per-step log lines (metrics.jsonl is written either way).
    """
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"disttrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    try:
        with one_thread_per_worker(nproc):
            results = elastic_launch(launch, _train_worker)(cfg.to_dict(), console)
    except ChildFailedError as exc:
        raise WorkerFailure(_describe(exc)) from None
    return results[0]


@contextlib.contextmanager
def one_thread_per_worker(nproc: int) -> Iterator[None]:
    """OMP_NUM_THREADS=1 for the workers started inside, unless the user set it or nproc is 1.

    torchrun does this when it starts several workers on a node; the elastic API it is built on does not.
    Without it, N workers with torch's default of one intra-op thread per core oversubscribe the cores
    (2 workers on 2 cores: twice the time per step). The elastic agent copies this process's OMP_NUM_THREADS
    into every worker's environment; it is set only for the launch, and this process's own torch, which
    has chosen its thread count already, is left as it was.
    """
    if nproc <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def _describe(exc: ChildFailedError) -> str:
    parts = []
    for rank, failure in sorted(exc.failures.items()):
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        message = (message or f"exit code {failure.exitcode}").strip().splitlines()[-1]
        parts.append(f"rank {rank}: {message}")
    return "worker failed: " + "; ".join(parts)

"""`disttrain train/verify --nproc N` outside torchrun: N local workers through torch's elastic launcher.

This is the same agent torchrun runs (torch.distributed.launcher.api), with a c10d rendezvous on a free
loopback port (port 0: the store picks it) and workers started with spawn, each with one intra-op thread
(see one_thread_per_worker). Several runs (or other tasks) can share one launched group, which pays the
worker start-up (import torch) once. With ``max_restarts`` R > 0 the agent restarts the whole worker group
when a worker dies (kill -9, OOM, an exception), up to R times; the restarted workers see
TORCHELASTIC_RESTART_COUNT > 0 and continue from the newest checkpoint (train.run).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .config import Config, config_from_dict
from .errors import RunFailure


class WorkerFailure(RunFailure):
    """A worker process failed; the message names the rank and its exception in one line."""


Task = tuple[Callable[..., Any], tuple]  # (fn, args): fn(env, *args) runs on every rank


def _run_tasks(tasks: list[Task], device: str, timeout_s: float) -> list[Any]:
    # Runs in each spawned worker: the elastic agent has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*.
    # One process group for all tasks, in order: the processes start (import torch) once.
    from .dist import distributed

    with distributed(device, timeout_s) as env:
        return [fn(env, *args) for fn, args in tasks]


def _train_task(env: Any, cfg_dict: dict[str, Any], console: bool, resume: bool = False,
                stop_at: int | None = None) -> list[float]:
    from .train import run

    return run(config_from_dict(cfg_dict), env, console=console, resume=resume, stop_at=stop_at).losses


def one_thread(env: Any) -> None:
    """A task: one intra-op thread in this worker, also when it is the only one (benchmarks, the demos)."""
    import torch

    torch.set_num_threads(1)


def launch_local_tasks(tasks: list[Task], nproc: int, device: str = "auto", timeout_s: float = 300.0,
                       max_restarts: int = 0) -> list[list[Any]]:
    """Run each task ``fn(env, *args)`` on ``nproc`` local workers, one after another in the same process
    group; return every rank's results (``[rank][task]``). ``fn`` must be importable (workers are spawned).
    ``max_restarts``: elastic restarts of the worker group after a failure (the tasks then run again from the
    first). This is the one way disttrain starts local ranks: ``--nproc``, verify, the demos and the
    benchmarks."""
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"disttrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts,
                          monitor_interval=0.1, start_method="spawn")
    try:
        with one_thread_per_worker(nproc):
            results = elastic_launch(launch, _run_tasks)(tasks, device, timeout_s)
    except ChildFailedError as exc:
        raise WorkerFailure(_describe(exc)) from None
    return [results[rank] for rank in range(nproc)]


def launch_local(cfg: Config, nproc: int, console: bool = True, resume: bool = False, stop_at: int | None = None,
                 max_restarts: int = 0) -> list[float]:
    """Train ``cfg`` with ``nproc`` local worker processes; return the global losses of the steps rank 0 ran
    last (after a resume or restart: from its starting step on).

    ``console``: rank 0 prints its per-step log lines (metrics.jsonl is written either way). ``resume`` and
    ``stop_at``: as in train.run. ``max_restarts``: elastic restarts of the worker group after a failure.
    """
    task = (_train_task, (cfg.to_dict(), console, resume, stop_at))
    return launch_local_tasks([task], nproc, cfg.train.device, cfg.comm.timeout_s, max_restarts)[0][0]


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

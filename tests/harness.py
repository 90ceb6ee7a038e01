"""A reusable pool of W gloo worker processes for multi-process tests.

Starting a process costs ~3 s (import torch), so a test module starts its pools once and sends them work:

    pool = WorkerPool(3)
    results = pool.run(fn, arg1, arg2)   # fn(arg1, arg2) on every rank; one result per rank, in rank order

``fn`` must be importable (a module-level function): workers are spawned. Each worker has joined a gloo
process group (``torch.distributed`` is initialised) before it runs anything. The rendezvous store listens
on a port the OS picks (port 0), so no port is ever hard-coded or raced for.

A worker exception is re-raised in the test as :class:`WorkerError` carrying every failing rank's traceback.
If a task outlives ``timeout`` (for example a rank died and its peers wait in a collective), the pool is
killed and restarted on the next ``run``: a broken test cannot hang or poison the ones after it.
"""

from __future__ import annotations

import datetime
import itertools
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_task_ids = itertools.count()


class WorkerError(AssertionError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def _worker_main(rank: int, world_size: int, port: int, tasks: Any, results: Any, timeout_s: float) -> None:
    torch.set_num_threads(1)  # W workers share 2 cores: no oversubscription
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        results.put((None, rank, "ready", None))
    except BaseException:
        results.put((None, rank, "err", traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, fn, args, kwargs = item
        try:
            # Pickle here, not in the queue's feeder thread: an unpicklable result (say, a tensor still
            # attached to an autograd graph) then becomes this task's error instead of a silent hang.
            results.put((task_id, rank, "ok", pickle.dumps(fn(*args, **kwargs))))
        except BaseException:
            results.put((task_id, rank, "err", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int, timeout: float = 90.0, collective_timeout: float = 60.0,
                 start_timeout: float = 120.0):
        self.world_size = world_size
        self.timeout = timeout  # per task
        self.start_timeout = start_timeout  # importing torch in W fresh processes
        self.collective_timeout = collective_timeout
        self.procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        # The test process hosts the rendezvous store on a free port; the W workers are its clients.
        self.store = dist.TCPStore("127.0.0.1", 0, self.world_size + 1, is_master=True, wait_for_workers=False)
        self.tasks = [ctx.Queue() for _ in range(self.world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, daemon=True,
                                  args=(r, self.world_size, self.store.port, self.tasks[r], self.results,
                                        self.collective_timeout))
                      for r in range(self.world_size)]
        for p in self.procs:
            p.start()
        self._collect(None, "starting the worker pool", self.start_timeout)

    def _collect(self, task_id: int | None, what: str, timeout: float) -> list[Any]:
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = _now() + timeout
        while len(out) + len(errors) < self.world_size:
            # Once one rank failed, its peers are probably stuck in a collective: give them a short grace.
            remaining = (min(deadline, _now() + 5.0) if errors else deadline) - _now()
            try:
                tid, rank, status, value = self.results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                self.kill()
                stuck = sorted(set(range(self.world_size)) - set(out) - set(errors))
                if errors:
                    break
                raise TimeoutError(f"{what}: ranks {stuck} did not finish within {timeout:.0f} s") from None
            if tid != task_id:
                continue  # a late answer to an earlier task that failed
            if status == "ok":
                out[rank] = pickle.loads(value)
            elif status == "ready":
                out[rank] = value
            else:
                errors[rank] = value
        if errors:
            if len(out) + len(errors) < self.world_size:
                self.kill()
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise WorkerError(f"{what}: ranks {sorted(errors)} raised\n{details}")
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self.alive:
            self.kill()
            self._start()
        task_id = next(_task_ids)
        for q in self.tasks:
            q.put((task_id, fn, args, kwargs))
        return self._collect(task_id, getattr(fn, "__name__", "task"), self.timeout)

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self.procs = []

    def close(self) -> None:
        if self.alive:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        self.kill()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _now() -> float:
    import time

    return time.monotonic()


def run_launched_tasks(tasks: list, device: str, timeout_s: float) -> tuple[str, Any]:
    """On a pool rank: what a worker started by ``launch_local_tasks`` runs (parallel/worker.py's ``run_tasks``),
    with a user error (ConfigError) returned as it is, as the launcher reports it, instead of raised."""
    from disttrain.errors import ConfigError
    from disttrain.parallel.worker import run_tasks

    try:
        return "ok", run_tasks(tasks, device, timeout_s)
    except ConfigError as exc:
        return "user_error", exc


LAUNCH_TIMEOUT_S = 600.0


def pooled_launch(pools: Callable[[int], WorkerPool]) -> Callable[..., list[list[Any]]]:
    """A stand-in for ``disttrain.parallel.launch.launch_local_tasks`` that runs the tasks on ``pools(nproc)``."""

    def launch(tasks: list, nproc: int, device: str = "auto", timeout_s: float = 300.0, max_restarts: int = 0,
               log_dir: Any = None) -> list[list[Any]]:
        assert max_restarts == 0, "pooled launches do not restart"
        pool = pools(nproc)
        # One launch may carry many runs (the demos send all of a world size's runs at once): it gets the time a
        # launched group would, bounded by the test's own timeout, not the pool's per-task default.
        saved, pool.timeout = pool.timeout, max(pool.timeout, LAUNCH_TIMEOUT_S)
        try:
            results = pool.run(run_launched_tasks, tasks, device, timeout_s)
        finally:
            pool.timeout = saved
        for status, value in results:
            if status == "user_error":
                raise value
        return [value for _, value in results]

    return launch

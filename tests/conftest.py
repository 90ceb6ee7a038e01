"""Shared fixtures: worker pools started once per test session and reused by every test module.

Starting a W-process pool costs W torch imports (~3 s each on 2 cores); the pools are the suite's largest
fixed cost, so every module shares them. A pool whose task failed or hung is restarted on its next use.
"""

from __future__ import annotations

import os

import pytest
import torch

# The suite runs many small processes on few cores (2 here): one intra-op thread per process, as torchrun
# gives each of several workers. Set before any test starts a subprocess, which inherits it; tiny models gain
# nothing from a second thread and lose much to oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.harness import WorkerPool


class Pools:
    """Lazily started pools, one per world size, alive for the test session."""

    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def __call__(self, world_size: int) -> WorkerPool:
        if world_size not in self._pools:
            self._pools[world_size] = WorkerPool(world_size)
        return self._pools[world_size]

    def close(self) -> None:
        # The session is over: nothing the workers hold is needed. Killing them is immediate; a graceful close
        # (each worker leaves its gloo group and unwinds its interpreter) took 6.5 s at the end of every run.
        for pool in self._pools.values():
            pool.kill()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()


@pytest.fixture
def pooled_launches(pools, monkeypatch):
    """``--nproc`` and verify's ranks run on the session's pools instead of freshly launched workers.

    For tests of what the ranks compute and how the command reports it (verdicts, tables, a config error found by
    the ranks' checks), not of the launch itself: each launch otherwise starts W interpreters that import torch and
    build DDP (~3.5 s of CPU each). The tasks run exactly as in a launched worker (worker.run_tasks, one process
    group for all of them); a ConfigError comes back as the launcher raises it. Launching, signals, restarts and
    worker failures stay with the tests that launch for real (test_cli, test_stop, test_resume, test_launch)."""
    from disttrain.run import nproc, tasks
    from tests.harness import pooled_launch

    launch = pooled_launch(pools)
    monkeypatch.setattr(tasks, "launch_local_tasks", launch)
    monkeypatch.setattr(nproc, "launch_local_tasks", launch)

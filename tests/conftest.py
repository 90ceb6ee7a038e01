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
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()

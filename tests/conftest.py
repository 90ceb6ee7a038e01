"""Shared fixtures: worker pools started once per test session and reused by every test module.

Starting a W-process pool costs W torch imports (~3 s each on 2 cores); the pools are the suite's largest
fixed cost, so every module shares them. A pool whose task failed or hung is restarted on its next use.
"""

from __future__ import annotations

import pytest

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

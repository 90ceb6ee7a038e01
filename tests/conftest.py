"""Shared fixtures: worker pools started once per test module and reused by its tests."""

from __future__ import annotations

import pytest

from tests.harness import WorkerPool


class Pools:
    """Lazily started pools, one per world size, alive for the test module."""

    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def __call__(self, world_size: int) -> WorkerPool:
        if world_size not in self._pools:
            self._pools[world_size] = WorkerPool(world_size)
        return self._pools[world_size]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="module")
def pools():
    p = Pools()
    yield p
    p.close()

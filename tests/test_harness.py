"""The multi-process harness itself: results in rank order, tracebacks surface, hung tasks are killed."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import WorkerError, WorkerPool


def _rank_and_sum() -> tuple[int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    return os.getpid()


def _unpicklable_result():
    return lambda: 1  # a lambda cannot be pickled


def _rank_one_hangs() -> None:
    if dist.get_rank() == 1:
        time.sleep(600)


def test_results_in_rank_order_and_pool_is_reused(pools):
    pool = pools(3)
    pids = [p.pid for p in pool.procs]
    assert pool.run(_rank_and_sum) == [(0, 6.0), (1, 6.0), (2, 6.0)]
    assert pool.run(_rank_and_sum) == [(0, 6.0), (1, 6.0), (2, 6.0)]
    assert [p.pid for p in pool.procs] == pids  # same processes: started once


def test_worker_traceback_surfaces_and_pool_recovers(pools):
    pool = pools(2)
    with pytest.raises(WorkerError, match=r"(?s)ranks \[1\] raised.*rank 1.*ValueError: deliberate failure on rank 1"):
        pool.run(_fail_on_rank_one)
    assert [r for r, _ in pool.run(_rank_and_sum)] == [0, 1]


def test_unpicklable_result_is_reported_not_hung(pools):
    pool = pools(2)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"(?s)ranks \[0, 1\] raised.*pickle"):
        pool.run(_unpicklable_result)
    assert time.monotonic() - start < 10


def test_hung_task_times_out_and_pool_restarts():
    with WorkerPool(2, timeout=3.0) as pool:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 3 s"):
            pool.run(_rank_one_hangs)
        assert time.monotonic() - start < 10
        assert pool.run(_rank_and_sum) == [(0, 3.0), (1, 3.0)]  # restarted on demand

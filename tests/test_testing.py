"""disttrain.testing's run_ranks: every rank's value, a failing rank reported in one block, and no process left
behind on failure or timeout (assert_equivalent: tests/test_own_loop.py).

The ranks are forks of one forkserver that has imported torch: the first call pays the imports once, later
groups cost a fraction of a second.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from disttrain.testing import run_ranks


def _identify(offset: int, *, scale: int = 1) -> tuple[int, int, int]:
    """Rank, world size (from the group fn finds initialised) and a value computed with a collective."""
    import torch
    value = torch.tensor([dist.get_rank() + offset])
    dist.all_reduce(value)
    return dist.get_rank(), dist.get_world_size(), int(value) * scale


def _record(pid_dir: str, child: subprocess.Popen) -> None:
    """This rank's pid and its child's, in a file that appears whole (written aside, then renamed)."""
    path = Path(pid_dir, f"{dist.get_rank()}.pids")
    path.with_suffix(".tmp").write_text(f"{os.getpid()} {child.pid}")
    path.with_suffix(".tmp").rename(path)


def _fail_on_rank_1(pid_dir: str) -> None:
    """Rank 1 starts a grandchild and raises; rank 0 waits in a collective that rank 1 never joins."""
    _record(pid_dir, subprocess.Popen(["sleep", "300"]))
    if dist.get_rank() == 1:
        # Rank 0 records its processes first: raising earlier could end it before it wrote them.
        deadline = time.monotonic() + 30
        while not Path(pid_dir, "0.pids").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ValueError("the loss is negative")  # the user's line
    dist.barrier()


def _hang(pid_dir: str) -> None:
    _record(pid_dir, subprocess.Popen(["sleep", "300"]))
    time.sleep(300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (reaped by its parent later)
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _pids(pid_dir: Path) -> list[int]:
    return [int(p) for f in sorted(pid_dir.glob("*.pids")) for p in f.read_text().split()]


def test_run_ranks_returns_every_ranks_value_in_rank_order():
    assert run_ranks(_identify, 3, 10, scale=2) == [(0, 3, 66), (1, 3, 66), (2, 3, 66)]


def test_a_failing_rank_raises_its_exception_with_rank_and_line_and_leaves_no_process(tmp_path):
    with pytest.raises(ValueError, match="the loss is negative") as info:
        run_ranks(_fail_on_rank_1, 2, str(tmp_path), timeout_s=60)
    note = "\n".join(info.value.__notes__)
    assert note.startswith("rank 1 of 2 raised ValueError: the loss is negative\n")
    assert "test_testing.py" in note and 'raise ValueError("the loss is negative")' in note
    pids = _pids(tmp_path)
    assert len(pids) == 4  # both ranks and their grandchildren
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]


def test_a_timeout_kills_every_rank_and_what_they_started(tmp_path):
    with pytest.raises(TimeoutError, match=r"ranks 0, 1 of 2 still running after 2 s"):
        run_ranks(_hang, 2, str(tmp_path), timeout_s=2)
    pids = _pids(tmp_path)
    assert len(pids) == 4
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]


def test_fn_must_be_importable():
    with pytest.raises(TypeError, match="module-level function"):
        run_ranks(lambda: 1, 2)

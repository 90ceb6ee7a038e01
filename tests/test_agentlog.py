"""The console line for a worker failure that torch's elastic agent restarts the group for (disttrain/parallel/agentlog.py),
from the agent's own log calls; the end-to-end restart is in test_resume.py (kill -9 under --max-restarts)."""

from __future__ import annotations

import logging

from disttrain.parallel.agentlog import describe_exit, restart_lines


def _agent_logs_a_restart(failures: list[tuple[int, int]], left: int, total: int) -> None:
    """What torch's agent logs when workers fail and it restarts them (the formats of torch 2.13)."""
    process = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    for exitcode, local_rank in failures:
        process.error("failed (exitcode: %s) local_rank: %s (pid: %s) of fn: %s (start_method: %s)",
                      exitcode, local_rank, 4242, "_run_tasks", "spawn")
    logging.getLogger("torch.distributed.elastic.agent.server.api").info(
        "[%s] Worker group %s. %s/%s attempts left; will restart worker group", "default", "FAILED", left, total)


def test_one_line_per_failed_worker_when_the_group_restarts():
    said: list[str] = []
    with restart_lines(said.append):
        _agent_logs_a_restart([(-9, 1)], left=3, total=3)
        _agent_logs_a_restart([(1, 0), (-15, 2)], left=2, total=3)
    assert said == ["disttrain: rank 1 was killed by signal SIGKILL; restarting the worker group (restart 1 of 3)",
                    "disttrain: rank 0 exited with code 1; restarting the worker group (restart 2 of 3)",
                    "disttrain: rank 2 was killed by signal SIGTERM; restarting the worker group (restart 2 of 3)"]
    # Outside, and for a failure that is not followed by a restart (it ends the launch), nothing is said.
    _agent_logs_a_restart([(-9, 1)], left=1, total=3)
    with restart_lines(said.append):
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").error(
            "failed (exitcode: %s) local_rank: %s (pid: %s) of fn: %s (start_method: %s)", -9, 0, 1, "f", "spawn")
    assert len(said) == 3
    assert logging.getLogger("torch.distributed.elastic.agent.server.api").level != logging.INFO  # restored


def test_describe_exit():
    assert describe_exit(-9) == "was killed by signal SIGKILL"
    assert describe_exit(2) == "exited with code 2"
    assert describe_exit(-200) == "was killed by signal 200"

"""Training as a task on ranks: ``disttrain train`` on one rank (train, stopping on a signal), and the
``--nproc N`` launches that run it on N local workers (parallel/launch.py starts them; nproc.py is the launcher's
side of ``disttrain train --nproc N``).

A task is ``fn(env, *args)`` with plain arguments (the resolved config as a dict), so it pickles into spawned
workers; every rank runs it in the same process group.
"""

from __future__ import annotations

from typing import Any

from ..checkpoint.format import checkpoint_at
from ..config.parse import config_from_dict
from ..config.schema import Config
from ..errors import StartupSignals
from ..parallel.env import DistEnv
from ..parallel.launch import launch_local_tasks
from ..verify.drawhook import RecordDraws
from .nproc import first_signal, launch_training
from .stop import GracefulStop, signal_name
from .train import run


def _train_task(env: Any, cfg_dict: dict[str, Any], console: bool, resume: bool = False,
                stop_at: int | None = None) -> list[float]:
    return run(config_from_dict(cfg_dict), env, console=console, resume=resume, stop_at=stop_at).losses


def _train_or_stop_task(env: Any, cfg_dict: dict[str, Any], resume: bool, stop_at: int | None) -> int | None:
    return train_or_stop(config_from_dict(cfg_dict), env, resume=resume, stop_at=stop_at)


def launch_local(cfg: Config, nproc: int, console: bool = True, resume: bool = False, stop_at: int | None = None,
                 max_restarts: int = 0) -> list[float]:
    """Train ``cfg`` with ``nproc`` local worker processes; return the global losses of the steps rank 0 ran
    last (after a resume or restart: from its starting step on).

    ``console``: rank 0 prints its per-step log lines (metrics.jsonl is written either way). ``resume`` and
    ``stop_at``: as in train.run. ``max_restarts``: elastic restarts of the worker group after a failure.
    """
    task = (_train_task, (cfg.to_dict(), console, resume, stop_at))
    return launch_local_tasks([task], nproc, cfg.train.device, cfg.comm.timeout_s, max_restarts,
                              cfg.train.out_dir)[0][0]


def train_or_stop(cfg: Config, env: DistEnv, resume: bool = False, stop_at: int | None = None) -> int | None:
    """``disttrain train`` on this rank: train, stopping on a signal (see the module docstring). Returns the
    signal number the run stopped for (rank 0 has printed the line that says where), or None."""
    with StartupSignals() as startup:
        stop = GracefulStop(startup)
        # The first step's random draws: one warning if any is not keyed per sample (verify/draws.py).
        result = run(cfg, env, resume=resume, stop_at=stop_at, hooks=[stop, RecordDraws(steps=1, warn=env.is_main)])
    if stop.signum is not None and env.is_main:
        path = checkpoint_at(cfg.train.out_dir, result.stopped_at)
        print(f"stopped by {signal_name(stop.signum)} at step {result.stopped_at}: checkpoint {path}; continue with "
              "--resume", flush=True)
    return stop.signum


__all__ = ["train_or_stop", "launch_local", "launch_training", "first_signal"]

"""The launcher's side of ``disttrain train --nproc N``: start N workers that train and stop on a signal.

The launcher itself never trains: it imports the launch machinery and names the workers' task by its import path
(parallel.launch.Named), so the training code (the trainer, its strategies, torch.distributed.tensor: seconds of
imports on a busy machine) loads only in the workers, which start that much sooner.
"""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.api import SignalException

from ..config.schema import Config
from ..errors import StoppedWhileStarting
from ..parallel.launch import Named, launch_local_tasks

TRAIN_OR_STOP = Named("disttrain.run.tasks:_train_or_stop_task")


def launch_training(cfg: Config, nproc: int, resume: bool = False, stop_at: int | None = None,
                    max_restarts: int = 0) -> int | None:
    """``disttrain train --nproc N``: train with ``nproc`` local workers that stop on a signal (stop.py).

    Returns the signal number the run stopped for, or None. A signal to this process reaches the workers through
    torch's elastic agent, which forwards it and waits for them to stop (they checkpoint first); then the agent
    raises SignalException here. One that came before the workers began their steps raises StoppedWhileStarting
    (one line, the signal's exit code). A signal to the workers alone (a scheduler signalling the processes of a node)
    comes back as their result.
    """
    task = (TRAIN_OR_STOP, (cfg.to_dict(), resume, stop_at))
    try:
        return launch_local_tasks([task], nproc, cfg.train.device, cfg.comm.timeout_s, max_restarts,
                                  cfg.train.out_dir)[0][0]
    except SignalException as exc:
        signum = first_signal(exc)
        stopped = getattr(exc, "results", {}).get(0) is not None  # rank 0 stopped at a step and said so
        if not stopped and exc.__context__ is None:  # one signal, and the workers had not begun their steps
            raise StoppedWhileStarting(signum) from None
        return signum


def first_signal(exc: SignalException) -> int:
    """The first signal the launcher received (stop.py: the first signal decides). A second one while torch's
    agent shuts the workers down raises anew inside the handling of the first, which stays its ``__context__``."""
    signum, link = int(exc.sigval), exc.__context__
    while link is not None:  # back to the earliest
        if isinstance(link, SignalException):
            signum = int(link.sigval)
        link = link.__context__
    return signum



__all__ = ["launch_training", "first_signal"]

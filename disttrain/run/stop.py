"""Stopping a run on a signal at a step that every rank agrees on, with a checkpoint there.

SIGTERM (what Slurm, Kubernetes and docker send before they kill), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's usual
warning signal) set a stop request on the rank that receives them; the signal may reach every rank (torchrun's
agent and the ``--nproc`` launcher forward it, Ctrl-C reaches the whole process group) or only some (a scheduler
signalling the processes of one node). The ranks agree without a collective of their own: the request is two
control values, [1, signal number], that travel in the step's last gradient bucket (comm.GradSync.control), so
after the reduction every rank holds [n, n * signal] for the n ranks that were asked, and all stop after the same
step. A signal that arrives during a step before its last bucket is packed stops the run after that step;
later, after the next one (the values are read once, when the bucket is packed, so no rank decides on a value
the others did not reduce). The loop then writes a checkpoint at exactly that step (whatever
``train.checkpoint_every`` is) and returns; the command prints one line and exits with 128 + the signal number.

Before the loop starts (config, imports, the workers' start, the model, a resume's checkpoint) a stop signal ends the
command with one line and the same exit code (errors.StartupSignals): there is no step to stop at yet.

A second signal exits at once, with the signal's own default action. The same signal twice within
:data:`REPEAT_WINDOW_S` counts once: Ctrl-C reaches a worker directly and again through its launcher.

The first signal decides: the line names it and the exit code is 128 + its number. A second signal that reaches
the ``--nproc`` launcher while its workers stop (SIGTERM, then Ctrl-C) changes neither (tasks.first_signal); one
that ends a process at once leaves no line, only that signal's own exit status.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import torch

from ..errors import STOP_SIGNALS, StartupSignals
from ..parallel.collectives import control_buffer
from .step import StepResult
from .train import Hook, Trainer


SIGNALS = STOP_SIGNALS
REPEAT_WINDOW_S = 2.0


class GracefulStop(Hook):
    """Installs the signal handlers for the run (main thread only) and stops the loop where the ranks agree."""

    def __init__(self, startup: StartupSignals | None = None) -> None:
        self._startup = startup  # its handlers, which ours replace in on_start, no longer stop a run that has begun
        # [asked, signal number] of this rank, set by the signal handler; made on the compute device in on_start,
        # so that the values travel on the device's own collective (NCCL on CUDA) with the gradients or alone.
        self.request: torch.Tensor | None = None
        self.signum: int | None = None  # the signal the run stopped for (agreed on every rank)
        self._received: tuple[int, float] | None = None
        self._previous: dict[int, object] = {}

    def on_start(self, trainer: Trainer) -> None:
        self._sync = sync = trainer.parts.sync
        self.request = control_buffer(2, trainer.env.device)
        sync.control = self.request  # read when the step's last bucket is packed
        if self._startup is not None:
            self._startup.started()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._received is None:
            self._received = (signum, now)
            if self.request is not None:  # (the handlers are installed by on_start, which makes it)
                # The number first: a reader on another thread (CUDA backward) sees [0, s] at worst, never [1, 0].
                self.request[1] = float(signum)
                self.request[0] = 1.0
            return
        first, when = self._received
        if signum == first and now - when < REPEAT_WINDOW_S:
            return  # the same request delivered twice (directly and forwarded)
        signal.signal(signum, signal.SIG_DFL)  # a second request: exit at once, as that signal does
        signal.raise_signal(signum)

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        # Reduced with the step's gradients (fsdp: by a small all_reduce of its own in sync) and read back with the
        # gradient norm, in the step's one host sync: the same on every rank.
        self._reduced = result.control

    def should_stop(self, trainer: Trainer, done: int) -> bool:
        asked, total = self._reduced
        if asked > 0:
            self.signum = round(total / asked)
            return True
        return False

    def on_end(self, trainer: Trainer) -> None:
        self._sync.control = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

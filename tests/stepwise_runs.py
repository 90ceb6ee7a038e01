"""Runs for the step-wise verification tests and measurements (module-level: pool workers import them)."""

from __future__ import annotations

from disttrain.run import train
from disttrain.parallel.sync import GradSync
from disttrain.config import config_from_dict
from disttrain.parallel.env import distributed
from disttrain.run.train import Hook


class SkipOneAllReduce(GradSync):
    """Rank ``rank`` silently drops the result of the gradient all_reduce of optimizer step ``step``: it goes on
    with its local gradient. Its peers complete the collective (a rank that issued none would hang them), so the
    run finishes normally, and only its state is wrong."""

    def __init__(self, inner: GradSync, rank: int, this_rank: int, step: int):
        self.inner, self.module, self.loss_divisor, self.env = inner, inner.module, inner.loss_divisor, inner.env
        self.skip = this_rank == rank
        self.step, self.calls = step, 0

    def sync(self) -> None:
        params = [p for p in self.module.parameters() if p.grad is not None]
        local = [p.grad.clone() for p in params] if self.skip and self.calls == self.step else None
        self.inner.sync()
        self.calls += 1
        if local is not None:
            for p, g in zip(params, local):
                p.grad.copy_(g)

    def no_sync(self):
        return self.inner.no_sync()


class SkipAllReduceHook(Hook):
    """Wraps the run's gradient strategy in SkipOneAllReduce once the parts are built (comm.impl=allreduce: one
    sync() per optimizer step)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_start(self, trainer) -> None:
        trainer.parts.sync = SkipOneAllReduce(trainer.parts.sync, self.rank, trainer.env.rank, self.step)


def train_run(cfg_dict: dict, resume: bool = False, stop_at: int | None = None,
              skip: tuple[int, int] | None = None) -> list[float]:
    """Train on this rank (in a pool worker: the pool's group); ``skip`` = (rank, step): see SkipOneAllReduce."""
    cfg = config_from_dict(cfg_dict)
    hooks = [SkipAllReduceHook(*skip)] if skip is not None else []
    with distributed("cpu", cfg.comm.timeout_s) as env:
        return train.run(cfg, env, console=False, resume=resume, stop_at=stop_at, hooks=hooks).losses

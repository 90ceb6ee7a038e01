"""Runs for the step-wise verification tests and measurements (module-level: pool workers import them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from disttrain import train
from disttrain.comm import GradSync
from disttrain.config import config_from_dict
from disttrain.dist import distributed


class SkipOneAllReduce(GradSync):
    """Rank ``rank`` silently drops the result of the gradient all_reduce of optimizer step ``step``: it goes on
    with its local gradient. Its peers complete the collective (a rank that issued none would hang them), so the
    run finishes normally, and only its state is wrong."""

    def __init__(self, inner: GradSync, rank: int, this_rank: int, step: int):
        self.inner, self.module, self.loss_divisor = inner, inner.module, inner.loss_divisor
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


@contextlib.contextmanager
def skipping_all_reduce(rank: int, step: int) -> Iterator[None]:
    """train.run builds its gradient sync through this factory while the context is open (comm.impl=allreduce:
    one sync() per optimizer step)."""
    real = train.build_grad_sync

    def build(module, cfg, env, local_count, global_count):
        return SkipOneAllReduce(real(module, cfg, env, local_count, global_count), rank, env.rank, step)

    with mock.patch.object(train, "build_grad_sync", build):
        yield


def train_run(cfg_dict: dict, resume: bool = False, until: int | None = None,
              skip: tuple[int, int] | None = None) -> list[float]:
    """Train on this rank (in a pool worker: the pool's group); ``skip`` = (rank, step): see SkipOneAllReduce."""
    cfg = config_from_dict(cfg_dict)
    with contextlib.ExitStack() as stack:
        if skip is not None:
            stack.enter_context(skipping_all_reduce(*skip))
        env = stack.enter_context(distributed("cpu", cfg.comm.timeout_s))
        return train.run(cfg, env, console=False, resume=resume, until=until).losses

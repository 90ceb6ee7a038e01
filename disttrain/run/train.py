"""The training loop: a run of a config on this rank, from its parts (build.py) and hooks.

Data flow: config -> process group (parallel/env.py) -> this rank's slice of the global batch (data/) -> model
(models/) inside its gradient strategy (parallel/sync.py) -> step (step.py: forward/backward per micro-batch, gradient
reduction, clipping of the global gradient, optimizer step), next lr (schedule.py) -> metrics reduced over ranks
(metrics.py) -> checkpoints (checkpoint/: rank 0's whole state, or every rank's own shards) and final.pt. A run
may start from a checkpoint (resume, elastic restart, another world size): the trajectory after step s depends
only on the state at s and the config, never on the world size.

Hooks see the loop without changing it: a :class:`Hook` is told when the run starts, when each step starts and
ends, and when a checkpoint is written and the run ends, and can ask the loop to stop after a step (with a
checkpoint there). Benchmarks time steps through one; tests inject faults through one.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .build import Parts, build
from ..checkpoint.writer import Checkpointer
from ..checkpoint.format import checkpoint_dir, clear_checkpoints, save_final
from ..checkpoint.format import writing
from ..config.schema import Config
from ..config.validate import check_world_size, checkpoint_format
from ..parallel.env import DistEnv
from ..observe.metrics import MetricsLogger, StepMetrics
from ..observe.tensorboard import clear_events
from ..checkpoint.resume import load_training_state, resume_state
from .step import StepResult, train_step


class Hook:
    """Callbacks of the training loop; every method is optional. Each is called on every rank."""

    def on_start(self, trainer: Trainer) -> None:
        """The parts are built (and loaded from a checkpoint when resuming); no step has run."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Step ``step`` (0-based) is about to run; its batch may already be read."""

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        """Step ``step`` ran: the optimizer stepped (unless result.stepped is False) and the lr moved on."""

    def should_stop(self, trainer: Trainer, done: int) -> bool:
        """True: stop after ``done`` completed steps, with a checkpoint there (whatever train.checkpoint_every is).
        Must answer the same on every rank."""
        return False

    def on_checkpoint(self, trainer: Trainer, done: int) -> None:
        """The checkpoint of ``done`` completed steps was handed to the writer."""

    def on_end(self, trainer: Trainer) -> None:
        """The loop is over (also after an error): called before the writer is drained."""


@dataclass
class TrainResult:
    model: nn.Module  # the unwrapped model after the last step
    losses: list[float] = field(default_factory=list)  # global mean loss per step run by this call
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global gradient norm per step
    skipped_steps: int = 0  # over the whole run, resumed runs included
    start_step: int = 0  # the step this call started from (> 0 when resumed from a checkpoint)
    optimizer: torch.optim.Optimizer | None = None
    stopped_at: int | None = None  # a hook stopped the run after this many completed steps (with a checkpoint)


class Trainer:
    """One run of ``cfg`` on this rank: :meth:`run` builds the parts, resumes, loops and cleans up."""

    def __init__(self, cfg: Config, env: DistEnv, hooks: tuple[Hook, ...] | list[Hook] = (), console: bool = True,
                 flush_seconds: float | None = None):
        self.cfg, self.env, self.hooks, self.console = cfg, env, list(hooks), console
        # About how often the logged losses are reduced over ranks (metrics.StepMetrics; None: its default).
        self.flush_seconds = flush_seconds
        self.parts: Parts | None = None
        self.result: TrainResult | None = None

    def run(self, resume: bool | str | Path = False, stop_at: int | None = None,
            allow: frozenset[str] = frozenset()) -> TrainResult:
        """Train; every rank returns the same model and losses.

        ``resume``: continue from a checkpoint (resume.resume_state). ``stop_at``: stop after this many completed
        steps (with a checkpoint there when checkpointing is on) instead of train.steps; no final.pt.
        ``allow``: config keys that may differ from the checkpoint's although they change the trajectory.
        """
        cfg, env, t = self.cfg, self.env, self.cfg.train
        check_world_size(cfg, env.world_size)
        stop = t.steps if stop_at is None else min(stop_at, t.steps)
        state = resume_state(cfg, env, resume, allow)
        start = 0 if state is None else state["step"]
        self._write_run_files(state, start)
        self.parts = parts = build(cfg, env)
        if self.console and env.note:  # device auto fell back to the CPU: said once the run is built (stderr, so
            print(env.note, file=sys.stderr, flush=True)  # that stdout stays the run's log lines)
        if state is not None:
            load_training_state(parts.sync, parts.optimizer, state, env.is_main)  # full or sharded
            parts.scheduler.load_state_dict(state["scheduler"])  # the step count: lr_at continues from here
            parts.scaler.load_state_dict(state.get("scaler"))  # fp16: the loss scale, the same on every rank
        self.result = result = TrainResult(model=parts.sync.model, skipped_steps=0 if state is None else
                                           state["skipped"], start_step=start, optimizer=parts.optimizer)
        tokens = cfg.data.name == "tokens"  # the token format: samples of data.seq_len target positions
        logger = MetricsLogger(Path(t.out_dir), env, t.log_every, t.steps, console=self.console, start_step=start,
                               tensorboard=t.tensorboard, seq_len=cfg.data.seq_len,
                               token_positions=t.global_batch_size * cfg.data.seq_len if tokens else None)
        metrics = StepMetrics(logger, env, result.losses)
        if self.flush_seconds is not None:
            metrics.flush_seconds = self.flush_seconds
        checkpointer = Checkpointer(t.out_dir, t.checkpoint_every, t.keep_checkpoints, t.steps, env.is_main,
                                    sharded=checkpoint_format(cfg) == "sharded", background=t.checkpoint_async,
                                    timeout_s=cfg.comm.timeout_s)
        finished = False
        try:
            self._call("on_start")
            self._loop(parts, metrics, checkpointer, start, stop)
            metrics.flush()  # result.losses and metrics.jsonl now hold every step
            finished = True
        finally:
            self._call("on_end")
            logger.close()
            parts.batches.close()
            if finished:
                checkpointer.close()  # the last checkpoint is durable (or its error raised) before returning
            else:
                with contextlib.suppress(Exception):  # the write in flight completes; the run's own error wins
                    checkpointer.close()
        if start + len(result.losses) == t.steps:  # the same on every rank
            final = parts.sync.state_dict()  # every rank: a sharded strategy gathers
            if env.is_main:
                save_final(Path(t.out_dir) / "final.pt", final["model"], t.steps, cfg.to_dict(), env.world_size)
                if self.console:  # where the run went, once: the directory a newcomer looks for next
                    checkpoints = f", checkpoints in {checkpoint_dir(t.out_dir)}" if t.checkpoint_every else ""
                    print(f"wrote {Path(t.out_dir) / 'final.pt'} (the model after step {t.steps}); the run directory "
                          f"{t.out_dir} also holds metrics.jsonl and config.yaml{checkpoints}", flush=True)
        return result

    def _loop(self, parts: Parts, metrics: StepMetrics, checkpointer: Checkpointer, start: int, stop: int) -> None:
        cfg, env, result = self.cfg, self.env, self.result
        t = cfg.train
        parts.sync.module.train()
        for step, micro_batches in parts.batches.steps(start, stop, env.device, t.accumulation_steps):
            start_time = time.perf_counter()
            self._call("on_step_start", step)
            lr = parts.optimizer.param_groups[0]["lr"]
            out = train_step(parts.sync, parts.optimizer, micro_batches, cfg.clip, step, loss=t.loss,
                             precision=t.precision, scaler=parts.scaler, token_weighting=t.token_weighting)
            if out.stepped:
                parts.scheduler.step()  # one schedule step per optimizer step
            else:  # skipped (non-finite, fp16 overflow): the schedule still moves on; torch warns if step 0 was
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    parts.scheduler.step()
            result.grad_norms.append(out.grad_norm)
            result.skipped_steps += not out.stepped
            # The global mean loss, (sum of per-sample losses) / (sum of counts), is reduced over ranks for many
            # steps at once when metrics flush (metrics.py), not with a blocking collective every step.
            extra = {"loss_scale": out.loss_scale} if parts.scaler.enabled else {}
            count = parts.batches.local_batch_size if out.count is None else out.count  # samples, or tokens
            metrics.record(step, out.loss_sum, count, lr=lr, grad_norm=out.grad_norm,
                           skipped=result.skipped_steps, ms=round(1000 * (time.perf_counter() - start_time), 3),
                           **extra)
            self._call("on_step_end", step, out)
            done = step + 1
            stopping = any([hook.should_stop(self, done) for hook in self.hooks])  # every hook is asked
            if stopping or checkpointer.due(done, stop):
                metrics.flush()  # metrics.jsonl holds every step up to this checkpoint before it exists
                checkpointer.save(parts.sync, parts.optimizer, parts.scheduler, done, result.skipped_steps,
                                  cfg.to_dict(), env.world_size, parts.scaler.state_dict())
                self._call("on_checkpoint", done)
            if stopping:
                result.stopped_at = done
                break

    def _write_run_files(self, state: dict | None, start: int) -> None:
        if not self.env.is_main:
            return
        out_dir = Path(self.cfg.train.out_dir)
        with writing(out_dir / "config.yaml", out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(self.cfg.to_yaml())  # the resolved config of this run
            checkpoint_dir(out_dir).mkdir(exist_ok=True)  # later writes never recreate a vanished run directory
        if state is None:
            clear_checkpoints(out_dir)  # an earlier run's checkpoints must never be resumed into this one
            clear_events(out_dir)  # nor its TensorBoard steps shown beside this run's (a resume purges instead)
        elif self.console and start == self.cfg.train.steps:  # under torchrun; cli says so before launching
            print(f"run already complete: the checkpoint is step {start} of train.steps={start}; nothing to train",
                  flush=True)
        elif self.console:
            print(f"resuming from step {start} (checkpoint written by {state['world_size']} processes, now "
                  f"{self.env.world_size})", flush=True)

    def _call(self, name: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)


def run(cfg: Config, env: DistEnv, console: bool = True, resume: bool | str | Path = False,
        stop_at: int | None = None, allow: frozenset[str] = frozenset(), hooks: tuple[Hook, ...] = ()
        ) -> TrainResult:
    """Train per ``cfg`` on this rank (see :meth:`Trainer.run`); ``console``: rank 0 prints a line every
    ``train.log_every`` steps (metrics.jsonl gets every step anyway)."""
    return Trainer(cfg, env, hooks, console).run(resume, stop_at, allow)


__all__ = ["Hook", "Trainer", "TrainResult", "run"]

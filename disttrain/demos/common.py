"""What every demonstration shares: running its runs, reading them, the result record, its files.

A demo registers the work it needs with a :class:`Lab`: training runs (a Config and a world size) and
functions to call on every rank of a worker group. The lab then runs the work of all requested demos with
one launched worker group per world size (:func:`disttrain.parallel.launch.launch_local_tasks`: W processes that
import torch once and run every task in turn in the same process group) and the world-size-1 runs in this
process, as ``disttrain verify`` does. Nothing is re-implemented for show: runs are
:func:`disttrain.train.run` with real gloo process groups, compared with :func:`disttrain.verify.compare_runs`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..run.build import build_data_and_model
from ..checkpoint.format import load_final
from ..config.schema import Config
from ..config.parse import config_from_dict, load_config
from ..parallel.env import DistEnv, distributed, threads_of_a_worker
from ..parallel.launch import launch_local_tasks, one_thread
from ..observe.runlog import read_metrics
from ..run.train import run
from ..verify.whole import compare_runs

EQUAL = 1e-10  # float64: "equals one device" (verify's tolerance); measured runs agree to ~1e-15
DIFFERENT = 1e-3  # "differs": a relative deviation at least this large
TIMEOUT_S = 120.0  # collective timeout of the demo worker groups


@dataclass(frozen=True)
class Settings:
    out: Path  # the demo writes into out/<name>/
    nproc: int = 4  # world size of the distributed runs
    quick: bool = False  # smaller settings (fewer steps and points), the same claims


def config(*overrides: str) -> Config:
    """A demo run's config: defaults < ``overrides``, on the CPU (gloo), with a collective timeout that ends a
    stuck worker group instead of hanging."""
    return load_config(None, ["train.device=cpu", f"comm.timeout_s={TIMEOUT_S}", *overrides])


# --------------------------------------------------------------------------- running

class Pending:
    """The value a registered call returns, available after :meth:`Lab.run_all`."""

    def __init__(self, what: str, demo: str = ""):
        self.what = what
        self.demo = demo
        self._value: Any = None
        self.done = False
        self.seconds = 0.0

    @property
    def value(self) -> Any:
        if not self.done:
            raise RuntimeError(f"{self.what}: not run yet")
        return self._value

    def set(self, value: Any) -> None:
        self._value, self.done = value, True


def train_task(env: DistEnv, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """One training run on this rank (importable: runs in spawned workers); rank 0's curves come back."""
    result = run(config_from_dict(cfg_dict), env, console=False)
    return {"losses": result.losses, "grad_norms": result.grad_norms, "skipped": result.skipped_steps}


def _timed(env: DistEnv, fn: Callable[..., Any], args: tuple) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(env, *args)
    return time.perf_counter() - start, value


class Lab:
    """Collects the runs of several demos, then runs them with one worker group per world size."""

    def __init__(self, settings: Settings, log: Callable[[str], None] | None = None):
        self.settings = settings
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._work: dict[int, list[tuple[Callable[..., Any], tuple, Pending]]] = {}
        self.done: list[Pending] = []
        self._trained: dict[str, Path] = {}
        self.demo = ""  # the demo registering work now: seconds are counted per demo
        self.seconds: dict[str, float] = {}

    def call(self, world_size: int, fn: Callable[..., Any], *args: Any) -> Pending:
        """Register ``fn(env, *args)`` on every rank of a ``world_size`` group (1: in this process)."""
        pending = Pending(getattr(fn, "__name__", "task"), self.demo)
        self._work.setdefault(world_size, []).append((fn, args, pending))
        return pending

    def train(self, run_dir: Path, cfg: Config, world_size: int) -> Path:
        """Register a training run of ``cfg`` into ``run_dir`` with ``world_size`` processes; returns run_dir."""
        # The same run asked for twice (the same config and world size, say by two demos) is trained once.
        key = json.dumps([replace(cfg, train=replace(cfg.train, out_dir="")).to_dict(), world_size], sort_keys=True)
        if key in self._trained:
            return self._trained[key]
        cfg = replace(cfg, train=replace(cfg.train, out_dir=str(run_dir)))
        self.call(world_size, train_task, cfg.to_dict())
        self._trained[key] = run_dir
        return run_dir

    def run_all(self) -> None:
        largest = max(self._work, default=1)
        for world_size in sorted(self._work, reverse=True):
            work = self._work.pop(world_size)
            start = time.perf_counter()
            if world_size == 1:  # against the largest group: the threads one of its ranks had (parallel/env.py)
                with distributed("cpu", TIMEOUT_S) as env, threads_of_a_worker(largest):
                    values = [_timed(env, fn, args) for fn, args, _ in work]
            else:
                # W workers share the machine's cores: one intra-op thread each.
                tasks = [(one_thread, ())] + [(_timed, (fn, args)) for fn, args, _ in work]
                values = launch_local_tasks(tasks, world_size, "cpu", TIMEOUT_S)[0][1:]
            for (_, _, pending), (seconds, value) in zip(work, values, strict=True):
                pending.set(value)
                pending.seconds = seconds
                self.done.append(pending)
                self.seconds[pending.demo] = self.seconds.get(pending.demo, 0.0) + seconds
            where = "in this process" if world_size == 1 else f"with {world_size} processes"
            self.log(f"  {len(work)} runs and measurements {where}: {time.perf_counter() - start:.1f} s")


# --------------------------------------------------------------------------- reading runs

def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def metric(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir)]


def evaluate(run_dir: Path) -> tuple[float, float]:
    """Eval-mode loss and accuracy of a run's final model on its whole dataset (BatchNorm then normalises with
    its running statistics, as a trained model is used)."""
    ckpt = load_final(run_dir / "final.pt")
    cfg = config_from_dict(ckpt["config"])
    data, model = build_data_and_model(cfg, torch.device("cpu"))
    model.load_state_dict(ckpt["model"])
    model.eval()
    x, y = data.fetch(np.arange(len(data)))
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def deviation(run_dir: Path, ref_dir: Path) -> float:
    """Largest relative difference of two runs, over the loss curve and every tensor of the final state
    (``disttrain verify``'s measure: max|a-b| / max|b|). NaN anywhere counts as infinitely different."""
    report = compare_runs(config(), run_dir, ref_dir)
    worst = max(report.max_loss_rel_diff, report.max_param_rel_diff)
    return math.inf if math.isnan(worst) else worst


# --------------------------------------------------------------------------- the result record

@dataclass
class Check:
    text: str  # what was checked, with the measured numbers
    holds: bool


@dataclass
class Result:
    name: str
    question: str
    experiment: str  # what was run, in a few sentences
    claim: str  # the statement the numbers decide
    checks: list[Check]
    summary: str  # one sentence with the numbers, stated when every check holds
    tables: list[list[list[str]]]  # each: a header row, then rows
    numbers: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # PNG file names in the demo's directory

    @property
    def holds(self) -> bool:
        return all(c.holds for c in self.checks)

    @property
    def conclusion(self) -> str:
        if self.holds:
            return self.summary
        failed = "; ".join(c.text for c in self.checks if not c.holds)
        return f"NOT SHOWN: the claim ({self.claim}) does not hold in this run: {failed}"

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "holds": self.holds, "conclusion": self.conclusion, "question": self.question,
                "checks": [{"check": c.text, "holds": c.holds} for c in self.checks], "plots": self.plots,
                **self.numbers}

    def text(self) -> str:
        """The table and the conclusion, as printed on the console."""
        lines = [f"== {self.name}: {self.question}"]
        for table in self.tables:
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for i, row in enumerate(table):
                lines.append("  " + "  ".join(cell.rjust(w) if j else cell.ljust(w)
                                              for j, (cell, w) in enumerate(zip(row, widths))))
                if i == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append(("holds: " if self.holds else "FAILS: ") + self.conclusion)
        return "\n".join(lines)


def save_result(result: Result, demo_dir: Path) -> Path:
    demo_dir.mkdir(parents=True, exist_ok=True)
    path = demo_dir / "result.json"
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=True) + "\n")
    return path


def sci(x: float) -> str:
    """A deviation or error for tables and sentences: 3.3e-16, 2.1e-02, inf."""
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def at_most(x: float, bound: float) -> bool:
    return math.isfinite(x) and x <= bound


def at_least(x: float, bound: float) -> bool:
    return not math.isfinite(x) or x >= bound  # inf/nan: a diverged run certainly differs

"""Mistake twins: the reference with a known weighting mistake, to measure whether this run could show it.

A verdict of EQUIVALENT means more than "within the rounding bound": the bound must be tight enough that the known
mistakes would have stood out of it *on this run*. How far a mistake moves a run depends on the run: the plain
average of per-rank means on an uneven split moved a float64 GPT-2 by 1.9e-1 and a bf16 SyncBN CNN by 1.6e-2, and
under Adam a summed gradient changes little (Adam is nearly invariant to the gradient's scale). So verify measures it:
the reference trains once more with the mistake emulated, and the mistake twin's distance from the reference must
exceed the bound in the loss or in the parameters (verdict.py).

The mistakes emulated here are the weighting ones, those whose effect can be small: in the W-process run each rank's
summed loss is divided by its own count instead of the global one. In one process, reading each batch as the ranks
do (twin.py), that is a weight per sample on the reference's objective, applied to the gradient of the model's
output (the loss and the count logged stay the reference's):

- ``comm.reduce=sum`` (the sum of per-rank means): weight N / n_r for rank r's samples, N the step's global count
  (samples or target tokens), n_r rank r's;
- ``comm.reduce=avg`` (DDP's average of per-rank means): N / (W n_r); the same as the reference (all weights 1)
  when every rank holds as many samples (tokens) in every step, so it need not be told apart there;
- per-micro-batch token means (``train.token_weighting=micro_batch_mean`` with avg, token losses under gradient
  accumulation): N / (W k c_rj), c_rj rank r's count in its micro-batch j.

Per-rank BatchNorm, clipping before averaging and a dropped all_reduce are not emulated: measured, they moved every
run by 3x its bound or more where they acted (docs/verdicts.md), and their emulation would need per-rank state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoint.format import load_final
from ..config.schema import Config
from ..observe.runlog import read_metrics
from ..parallel.env import DistEnv
from ..data.batching import rank_parts
from ..run.loss import IGNORE_INDEX, TOKEN_LOSSES
from ..run.train import Hook, Trainer
from .twin import train_reference
from .verdict import Mistake, noise

SUM, AVG, MICRO_MEANS = "comm.reduce=sum", "comm.reduce=avg", "per-micro-batch token means"


def applicable(cfg: Config, ranks: int) -> list[str]:
    """The weighting mistakes that can change this config's numbers at ``ranks`` ranks, cheapest to tell apart first
    (avg is the smallest; whether it acts at all is known once its twin has read the counts: :attr:`AsMistake.acted`)."""
    if ranks < 2:
        return []
    tokens = cfg.train.loss in TOKEN_LOSSES and cfg.train.token_weighting == "tokens"
    found = [AVG] if tokens or cfg.train.global_batch_size % ranks else []
    if tokens and cfg.train.accumulation_steps > 1:
        found.append(MICRO_MEANS)
    return [*found, SUM]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, weight):
        ctx.save_for_backward(weight)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight.to(grad.dtype).view(-1, *[1] * (grad.dim() - 1)), None


def _counts(y: torch.Tensor, tokens: bool) -> torch.Tensor:
    """Per sample: 1, or its number of targets."""
    if not tokens:
        return torch.ones(len(y), dtype=torch.float64)
    return (y != IGNORE_INDEX).reshape(len(y), -1).sum(1).double().cpu()


class AsMistake(Hook):
    """Weights the gradient of each sample's output as ``mistake`` would (see the module docstring); after
    :class:`~.twin.AsRanks` in the hooks, which makes the run read each batch as ``ranks`` ranks. ``acted``: some
    weight was not 1 (the mistake changed this run)."""

    def __init__(self, mistake: str, ranks: int):
        if mistake not in (SUM, AVG, MICRO_MEANS):
            raise ValueError(f"mistake: {mistake!r} is not one of {(SUM, AVG, MICRO_MEANS)}")
        self.mistake, self.ranks, self.acted = mistake, ranks, False
        self._weights: list[torch.Tensor] = []

    def on_start(self, trainer: Trainer) -> None:
        batches, cfg = trainer.parts.batches, trainer.cfg
        tokens = cfg.train.loss in TOKEN_LOSSES and cfg.train.token_weighting != "sequence_mean"
        steps = batches.steps

        def weighted(*args, **kwargs) -> Iterator:
            for step, micro in steps(*args, **kwargs):
                self._weights = self._step_weights([m[1] for m in micro], batches.rank_order, tokens)
                yield step, micro

        batches.steps = weighted
        trainer.parts.sync.model.register_forward_hook(self._scale)

    def _step_weights(self, targets: list[torch.Tensor], order, tokens: bool) -> list[torch.Tensor]:
        k, w = len(targets), self.ranks
        parts = [rank_parts(len(y), w, order) for y in targets]
        counts = [_counts(y, tokens) for y in targets]
        per_rank_mb = torch.zeros(w, k, dtype=torch.float64)  # c_rj
        for j, (c, p) in enumerate(zip(counts, parts)):
            for r, part in p:
                per_rank_mb[r, j] = c[part].sum()
        per_rank, total = per_rank_mb.sum(1), per_rank_mb.sum()
        out = []
        for j, (y, p) in enumerate(zip(targets, parts)):
            weight = torch.ones(len(y), dtype=torch.float64)
            for r, part in p:
                if self.mistake == SUM:
                    weight[part] = total / per_rank[r].clamp_min(1)
                elif self.mistake == AVG:
                    weight[part] = total / (w * per_rank[r].clamp_min(1))
                else:
                    weight[part] = total / (w * k * per_rank_mb[r, j].clamp_min(1))
            self.acted = self.acted or bool((weight != 1).any())
            out.append(weight.to(y.device))
        return out

    def _scale(self, module, args, output):
        weight = self._weights.pop(0)
        if isinstance(output, torch.Tensor):
            return _ScaleGrad.apply(output, weight)
        output["logits"] = _ScaleGrad.apply(output["logits"], weight)  # a ModelOutput
        return output


def mistake_twins(cfg: Config, root: Path, env: DistEnv, ranks: int, bounds: tuple[float, float]) -> list[Mistake]:
    """whole.verify's mistake twins: the reference trained with each weighting mistake that applies, into
    root/mistake0, 1, ..., each measured against root/reference; it stops at the first one that the run's ``bounds``
    (loss, parameters) would not tell apart."""
    ref = _final_run(root / "reference")
    found = []
    for i, name in enumerate(applicable(cfg, ranks)):
        hook = AsMistake(name, ranks)
        train_reference(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(root / f"mistake{i}"))), env, ranks, hooks=(hook,))
        moved = noise(*_final_run(root / f"mistake{i}"), *ref)
        found.append(Mistake(name, moved["loss"], moved["parameters"], hook.acted))
        if hook.acted and moved["loss"] <= bounds[0] and moved["parameters"] <= bounds[1]:
            break
    return found



def _final_run(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    return load_final(run_dir / "final.pt")["model"], [r["loss"] for r in read_metrics(run_dir)]


__all__ = ["AsMistake", "applicable", "mistake_twins", "SUM", "AVG", "MICRO_MEANS"]

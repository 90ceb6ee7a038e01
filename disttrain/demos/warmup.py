"""Why warm up large batches.

A large global batch (B=1024 on the digits data, W processes with SyncBatchNorm) trained with the linear
scaling rule, lr = optim.lr * B / 256, at an lr near the edge of what the model tolerates: once with the full
lr from step 0, once with linear warmup from 5% of it over the first 20 steps, for several seeds (each seed
its own initialisation and data order). The outcome of an unstable start varies from seed to seed, so the
claim is about the median final loss over the seeds and how many seeds warmup wins.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

from .common import Check, Lab, Result, config, losses, metric
from .figures import COLORS, axes, loss_axes, new_figure, save

NAME = "warmup"
QUESTION = "Why warm up the learning rate when the batch is large?"
CLAIM = ("with a large batch and the linearly scaled lr, training without warmup ends with a much higher loss than "
         "with linear warmup (median over seeds at least 3x, and in most seeds)")
GLOBAL_BATCH, BASE_LR, REFERENCE_BATCH, WARMUP_STEPS, START_FACTOR = 1024, 1.4, 256, 20, 0.05
TAIL = 5  # final loss: the mean of the last TAIL steps' losses
RATIO = 3.0


def final_loss(run_dir: Path) -> float:
    tail = losses(run_dir)[-TAIL:]
    value = sum(tail) / len(tail)
    return value if math.isfinite(value) else math.inf  # a diverged run: worse than any finite loss


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w, quick = lab.settings.nproc, lab.settings.quick
    steps, seeds = (40, 3) if quick else (60, 5)
    base = ["data.name=digits", "data.num_samples=1797", "model.name=mlp", "model.hidden=128", "model.norm=syncbn",
            "train.dtype=float32", f"train.steps={steps}", f"train.global_batch_size={GLOBAL_BATCH}",
            f"optim.lr={BASE_LR}", "schedule.scale_lr=true", f"schedule.reference_batch_size={REFERENCE_BATCH}"]
    warm = ["schedule.warmup=linear", f"schedule.warmup_steps={WARMUP_STEPS}",
            f"schedule.warmup_start_factor={START_FACTOR}"]
    runs = {(kind, seed): lab.train(out / "runs" / f"{kind}_seed{seed}",
                                    config(*base, f"seed={seed}", *(warm if kind == "warmup" else [])), w)
            for seed in range(seeds) for kind in ("none", "warmup")}

    def finish() -> Result:
        final = {key: final_loss(d) for key, d in runs.items()}
        med = {kind: statistics.median(final[kind, s] for s in range(seeds)) for kind in ("none", "warmup")}
        wins = sum(final["warmup", s] < final["none", s] for s in range(seeds))
        ratio = med["none"] / med["warmup"] if med["warmup"] > 0 else math.inf
        eta = BASE_LR * GLOBAL_BATCH / REFERENCE_BATCH
        checks = [
            Check(f"median final loss without warmup {med['none']:.3g} is {ratio:.3g}x that with warmup "
                  f"{med['warmup']:.3g} (>= {RATIO:g}x)", ratio >= RATIO),
            Check(f"warmup ends lower in {wins} of {seeds} seeds (a majority)", wins > seeds / 2),
        ]
        summary = (f"At B={GLOBAL_BATCH} with the linearly scaled lr {eta:g}, the run without warmup ends at a median "
                   f"loss of {med['none']:.3g} over {seeds} seeds, {ratio:.3g}x the {med['warmup']:.3g} of linear "
                   f"warmup over {WARMUP_STEPS} steps, which ends lower in {wins} of {seeds} seeds.")
        table = [["seed", "no warmup: final / max loss", "linear warmup: final / max loss"]]
        for s in range(seeds):
            table.append([str(s), *(f"{final[k, s]:.4g} / {max(losses(runs[k, s])):.4g}" for k in ("none", "warmup"))])
        table.append(["median", f"{med['none']:.4g}", f"{med['warmup']:.4g}"])
        plots = [_plot(out, runs, seeds, eta)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"An MLP with SyncBatchNorm on the 8x8 digits (float32, SGD with momentum, {steps} steps), "
                        f"W={w} processes, global batch {GLOBAL_BATCH}, lr {BASE_LR} x {GLOBAL_BATCH}/"
                        f"{REFERENCE_BATCH} = {eta:g} by the linear scaling rule: without warmup, and with linear "
                        f"warmup from {START_FACTOR:g} x lr over {WARMUP_STEPS} steps; seeds 0 to {seeds - 1}. "
                        f"Final loss: the mean training loss of the last {TAIL} steps."),
            numbers={"world_size": w, "global_batch_size": GLOBAL_BATCH, "lr": eta, "seeds": seeds,
                     "final_loss": {k: [final[k, s] for s in range(seeds)] for k in ("none", "warmup")},
                     "median_final_loss": med, "ratio": ratio, "warmup_wins": wins})

    return finish


def _plot(out: Path, runs: dict, seeds: int, eta: float) -> str:
    fig, (ax, lr_ax) = new_figure(2, (12.0, 4.2))
    labels = {"none": "no warmup", "warmup": f"linear warmup, {WARMUP_STEPS} steps"}
    for kind in ("none", "warmup"):
        for s in range(seeds):
            curve = losses(runs[kind, s])
            ax.plot(range(1, len(curve) + 1), [min(v, 1e6) for v in curve], color=COLORS[kind], alpha=0.75,
                    linewidth=1.2, label=f"{labels[kind]} ({seeds} seeds)" if s == 0 else None)
        lr = metric(runs[kind, 0], "lr")
        lr_ax.plot(range(1, len(lr) + 1), lr, color=COLORS[kind], label=labels[kind], linewidth=2)
    loss_axes(ax, f"training loss, B={GLOBAL_BATCH}, lr {eta:g}")
    axes(lr_ax, "learning rate schedule", ylabel="lr")
    return save(fig, out, "warmup.png")

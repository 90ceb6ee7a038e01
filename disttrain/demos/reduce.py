"""Mean, sum or max? Gradient reduction modes against one device, on an uneven split.

W processes train the same MLP on the same global batches (B=30 over W=4: slices 8, 8, 7, 7), once per
``comm.reduce`` mode, and one process trains on the whole global batch:

- mean: the count-weighted mean, each rank's summed loss over the global B, gradients summed;
- avg: torch DDP's own averaging, (1/W) sum_r of each rank's local-mean gradient (all-reduce SUM, then / W);
- sum: the local-mean gradients summed (W times the gradient for equal slices);
- max: their elementwise maximum.

avg also runs on an even split (B=32 over W=4), where every local mean has the same weight and it is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .common import DIFFERENT, EQUAL, Check, Lab, Result, at_least, at_most, config, deviation, losses, sci
from .figures import COLORS, ONE_DEVICE, axes, deviation_bars, loss_axes, marked, new_figure, save

NAME = "reduce"
QUESTION = "Are gradients averaged, summed or maxed across processes, and which equals one device?"
CLAIM = ("only the count-weighted mean equals one device on an uneven split; DDP's plain average of local means, "
         "the sum and the max do not, and the plain average is exact only on an even split")
MODES = ("mean", "avg", "sum", "max")
SENDS = {"mean": "sum_i grad l_i / B (count-weighted)", "avg": "local mean, then / W (torch DDP)",
         "sum": "local mean, summed", "max": "local mean, elementwise max"}


def uneven_batch(world_size: int) -> int:
    """About 8 samples per rank, not divisible by W: 30 over 4 ranks gives 8, 8, 7, 7."""
    b = 8 * world_size - 2
    return b if b % world_size else b + 1


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w = lab.settings.nproc
    steps = 15 if lab.settings.quick else 40
    uneven, even = uneven_batch(w), 8 * w
    base = ["model.name=mlp", "model.hidden=64", "train.dtype=float64", f"train.steps={steps}", "optim.lr=0.05"]
    runs = out / "runs"
    dist = {m: lab.train(runs / m, config(*base, f"train.global_batch_size={uneven}", f"comm.reduce={m}"), w)
            for m in MODES}
    one = lab.train(runs / "one_device", config(*base, f"train.global_batch_size={uneven}"), 1)
    avg_even = lab.train(runs / "avg_even", config(*base, f"train.global_batch_size={even}", "comm.reduce=avg"), w)
    one_even = lab.train(runs / "one_device_even", config(*base, f"train.global_batch_size={even}"), 1)

    def finish() -> Result:
        dev = {m: deviation(dist[m], one) for m in MODES}
        dev_even = deviation(avg_even, one_even)
        final = {m: losses(dist[m])[-1] for m in MODES}
        checks = [
            Check(f"mean: deviation from one device {sci(dev['mean'])} <= {EQUAL:.0e}", at_most(dev["mean"], EQUAL)),
            *[Check(f"{m}: deviation {sci(dev[m])} >= {DIFFERENT:.0e}", at_least(dev[m], DIFFERENT))
              for m in ("avg", "sum", "max")],
            Check(f"avg on the even split B={even}: deviation {sci(dev_even)} <= {EQUAL:.0e}",
                  at_most(dev_even, EQUAL)),
        ]
        summary = (f"Only the count-weighted mean equals one device on B={uneven} over W={w} (deviation "
                   f"{sci(dev['mean'])}); DDP's plain average of local means is off by {sci(dev['avg'])} there "
                   f"(exact on the even B={even}: {sci(dev_even)}), the sum by {sci(dev['sum'])}, the max by "
                   f"{sci(dev['max'])}.")
        table = [["comm.reduce", "each rank contributes", f"deviation (B={uneven})", "final loss"]]
        table += [[m, SENDS[m], sci(dev[m]), f"{final[m]:.4f}"] for m in MODES]
        table += [["avg", f"even split, B={even}", sci(dev_even), f"{losses(avg_even)[-1]:.4f}"],
                  ["one device", "whole global batch", "-", f"{losses(one)[-1]:.4f}"]]
        plots = [_plot(out, dist, one, dev, dev_even, uneven, even, w)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"An MLP (float64, SGD with momentum, {steps} steps) trained by W={w} processes with "
                        f"each comm.reduce mode on B={uneven} (uneven slices), and by one process on the same "
                        f"global batches; the plain average also on B={even} (even slices). Deviation: largest "
                        "relative difference of the loss curve and the final parameters, as disttrain verify "
                        "measures it."),
            numbers={"world_size": w, "global_batch_size": uneven, "even_global_batch_size": even,
                     "deviation": {**dev, "avg_even": dev_even}, "final_loss": {**final, "one_device": losses(one)[-1]},
                     "equal_tolerance": EQUAL, "different_threshold": DIFFERENT})

    return finish


def _plot(out: Path, dist: dict[str, Path], one: Path, dev: dict[str, float], dev_even: float, uneven: int,
          even: int, w: int) -> str:
    fig, (ax, gap_ax, bars) = new_figure(3, (15.0, 4.2))
    ref = losses(one)
    # mean, avg and one device lie within 1e-3 of each other in the loss: each series has its own marker, and the
    # middle panel draws the differences that the left one cannot show.
    for i, m in enumerate(MODES):
        curve = losses(dist[m])
        style = marked(i, len(curve), color=COLORS[m], label=f"W={w}, {m}", zorder=3,
                       linestyle="--" if m == "mean" else "-", linewidth=2.2 if m == "mean" else 1.4)
        ax.plot(range(1, len(curve) + 1), curve, **style)
        # |loss - one device's| per step, relative to the curve's scale; an exact zero is drawn at 1e-17
        scale = max(abs(v) for v in ref)
        gap_ax.plot(range(1, len(curve) + 1), [max(abs(a - b) / scale, 1e-17) for a, b in zip(curve, ref)], **style)
    ax.plot(range(1, len(ref) + 1), ref, **ONE_DEVICE)
    loss_axes(ax, f"loss per step, B={uneven} over W={w}\n(mean, avg, one device overlap: see the middle panel)")
    gap_ax.axhline(EQUAL, color="green", linestyle="--", linewidth=1, label=f"equal: <= {EQUAL:.0e}")
    axes(gap_ax, "loss difference from one device, per step\n(an exact zero is drawn at 1e-17)",
         ylabel="|loss - one device| / max loss", log=True)
    labels = [*MODES, f"avg\n(B={even})"]
    values = [*(dev[m] for m in MODES), dev_even]
    deviation_bars(bars, labels, values, [COLORS[m] for m in MODES] + [COLORS["avg"]],
                   "largest deviation from one device", f"comm.reduce (B={uneven} unless noted)")
    return save(fig, out, "reduce.png")

"""Where clipping goes.

An lr high enough that, unclipped, the gradients explode (SGD with momentum at lr 1 on an MLP): W processes
train without clipping, with the global gradient norm clipped after averaging (``clip.mode: norm``, the
right place: every rank holds the averaged gradient, so the local clip is the single-device clip) and with
each rank's gradient clipped before averaging (``clip.before_average``, the wrong order); one process trains
with clipping on the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from .common import DIFFERENT, EQUAL, Check, Lab, Result, at_least, at_most, config, deviation, losses, metric, sci
from .figures import COLORS, ONE_DEVICE, axes, finite, loss_axes, new_figure, save

NAME = "clip"
QUESTION = "Where does gradient clipping go: before or after averaging across processes?"
CLAIM = ("without clipping the loss explodes; clipping the averaged gradient equals one device, clipping each "
         "rank's gradient before averaging does not")
LR, MAX_NORM, SPIKE = 1.0, 0.25, 10.0
KINDS = {"none": "no clipping", "after": "clip after averaging", "before": "clip before averaging"}


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w = lab.settings.nproc
    steps = 20 if lab.settings.quick else 40
    base = ["model.name=mlp", "model.hidden=64", "train.dtype=float64", f"train.steps={steps}",
            f"train.global_batch_size={8 * w}", f"optim.lr={LR}", "comm.impl=allreduce"]
    clip = ["clip.mode=norm", f"clip.max_norm={MAX_NORM}"]
    runs = out / "runs"
    dirs = {"none": lab.train(runs / "none", config(*base), w),
            "after": lab.train(runs / "after", config(*base, *clip), w),
            "before": lab.train(runs / "before", config(*base, *clip, "clip.before_average=true"), w)}
    one = lab.train(runs / "one_device", config(*base, *clip), 1)

    def finish() -> Result:
        curve = {k: losses(d) for k, d in dirs.items()}
        norms = metric(dirs["after"], "grad_norm")
        skipped = {k: metric(d, "skipped")[-1] for k, d in dirs.items()}
        spike = max(finite(curve["none"])) / curve["none"][0]
        exploded = not all(math.isfinite(v) for v in curve["none"]) or spike >= SPIKE
        dev = {k: deviation(dirs[k], one) for k in ("after", "before")}
        clipped = sum(n > MAX_NORM for n in norms)
        checks = [
            Check(f"no clipping: the loss rises to {spike:.3g}x its initial value (>= {SPIKE:g}x or non-finite; "
                  f"{skipped['none']} skipped steps)", exploded),
            Check(f"clip after averaging: deviation from one device {sci(dev['after'])} <= {EQUAL:.0e}",
                  at_most(dev["after"], EQUAL)),
            Check(f"clip before averaging: deviation {sci(dev['before'])} >= {DIFFERENT:.0e}",
                  at_least(dev["before"], DIFFERENT)),
            Check(f"clipped after averaging, the loss falls from {curve['after'][0]:.3g} to {curve['after'][-1]:.3g}",
                  curve["after"][-1] < curve["after"][0]),
        ]
        summary = (f"Unclipped at lr {LR:g}, the loss explodes to {spike:.3g}x its start; clipping the averaged "
                   f"gradient to norm {MAX_NORM:g} (active in {clipped} of {len(norms)} steps) trains and equals one "
                   f"device (deviation {sci(dev['after'])}), while clipping before averaging deviates by "
                   f"{sci(dev['before'])}.")
        table = [["run", "final loss", "max loss", "max grad norm", "skipped steps", "deviation from one device"]]
        for k, label in KINDS.items():
            table.append([label, f"{curve[k][-1]:.4g}", f"{max(curve[k]):.4g}",
                          f"{max(metric(dirs[k], 'grad_norm')):.4g}", str(skipped[k]),
                          "-" if k == "none" else sci(dev[k])])
        table.append(["one device, clipped", f"{losses(one)[-1]:.4g}", f"{max(losses(one)):.4g}",
                      f"{max(metric(one, 'grad_norm')):.4g}", str(metric(one, "skipped")[-1]), "-"])
        plots = [_plot(out, dirs, one, w)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"An MLP (float64, SGD with momentum 0.9 at lr {LR:g}, {steps} steps, global batch {8 * w}) "
                        f"trained by W={w} processes without clipping, with the global gradient norm clipped to "
                        f"{MAX_NORM:g} after averaging, and with each rank's gradient clipped to {MAX_NORM:g} before "
                        "averaging; and by one process with clipping on the same global batches."),
            numbers={"world_size": w, "lr": LR, "max_norm": MAX_NORM, "spike": spike, "skipped": skipped,
                     "clipped_steps": clipped, "deviation": dev,
                     "final_loss": {**{k: curve[k][-1] for k in KINDS}, "one_device": losses(one)[-1]}})

    return finish


def _plot(out: Path, dirs: dict[str, Path], one: Path, w: int) -> str:
    fig, (ax, norm_ax) = new_figure(2, (12.0, 4.2))
    for k, label in KINDS.items():
        style = {"color": COLORS[k], "label": f"W={w}, {label}", "zorder": 3,
                 "linestyle": "--" if k == "after" else "-", "linewidth": 2 if k == "after" else 1.4}
        steps = range(1, len(losses(dirs[k])) + 1)
        ax.plot(steps, finite(losses(dirs[k])), **style)
        norm_ax.plot(steps, finite(metric(dirs[k], "grad_norm")), **style)
    ax.plot(range(1, len(losses(one)) + 1), losses(one), **ONE_DEVICE)
    norm_ax.plot(range(1, len(losses(one)) + 1), metric(one, "grad_norm"), **ONE_DEVICE)
    loss_axes(ax, "loss per step")
    norm_ax.axhline(MAX_NORM, color="black", linestyle=":", linewidth=1, label=f"max_norm {MAX_NORM:g}")
    axes(norm_ax, "global gradient norm before clipping", ylabel="gradient norm", log=True)
    return save(fig, out, "clip.png")

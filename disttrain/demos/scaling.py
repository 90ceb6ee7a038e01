"""N processes x B/N samples = one device x B.

Fixed global batch: the same config (B=32) trained with W = 1, 2 and 4 processes: every step sees the same
32 samples, split 32, 16+16 or 8+8+8+8, and the curves lie on each other. Fixed per-rank batch (8 samples
per rank, so B = 8W grows with W), compared after the same number of samples: with the lr unchanged, the
larger batch takes W times fewer steps of the same size and falls behind the one-device run; with the lr
scaled by W (the linear scaling rule, ``schedule.scale_lr``) it keeps up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .common import DIFFERENT, EQUAL, Check, Lab, Result, at_least, at_most, config, deviation, evaluate, losses, sci
from .figures import ONE_DEVICE, axes, label_bars, loss_axes, new_figure, save

NAME = "scaling"
QUESTION = "Is N processes with B/N samples each really one device with B?"
CLAIM = ("at a fixed global batch the W = 1, 2, 4 runs are the same run; a fixed per-rank batch (global batch growing "
         "with W) changes the trajectory, and after the same samples it lags unless the lr is scaled with W")
GLOBAL_BATCH, PER_RANK, BASE_LR = 32, 8, 0.01  # BASE_LR is the lr for PER_RANK samples per step
LINE = {1: "-", 2: "--", 4: ":"}


def world_sizes(nproc: int, quick: bool) -> list[int]:
    """1, 2 and nproc; quick settings leave out 2 (its worker group would cost a start-up of its own)."""
    return sorted({1, nproc} if quick else {1, 2, nproc})


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    quick = lab.settings.quick
    sizes = world_sizes(lab.settings.nproc, quick)
    top = sizes[-1]
    steps = 15 if quick else 30  # steps of the largest batch; the one-device run with 8 samples takes top x as many
    base = ["model.name=mlp", "model.hidden=64", "train.dtype=float64"]
    runs = out / "runs"
    # Fixed global batch, at the lr the linear scaling rule gives this batch.
    fixed_lr = BASE_LR * GLOBAL_BATCH / PER_RANK
    fixed = {w: lab.train(runs / f"global{GLOBAL_BATCH}_w{w}",
                          config(*base, f"train.global_batch_size={GLOBAL_BATCH}", f"optim.lr={fixed_lr}",
                                 f"train.steps={steps}"), w) for w in sizes}
    # Fixed per-rank batch: B = 8W, each run sees the same number of samples (8 * top * steps).
    per_rank = {}
    for w in sizes:
        for scaled in ((False,) if w == 1 else (False, True)):
            lr = BASE_LR * w if scaled else BASE_LR
            cfg = config(*base, f"train.global_batch_size={PER_RANK * w}", f"optim.lr={lr}",
                         f"train.steps={steps * top // w}")
            per_rank[w, scaled] = lab.train(runs / f"perrank{PER_RANK}_w{w}{'_scaled' if scaled else ''}", cfg, w)

    def finish() -> Result:
        dev_fixed = {w: deviation(fixed[w], fixed[1]) for w in sizes[1:]}
        samples = PER_RANK * top * steps
        ev = {key: evaluate(d)[0] for key, d in per_rank.items()}
        one = ev[1, False]
        lag = {key: v / one for key, v in ev.items()}  # full-data loss relative to one device's, same samples
        # A different trajectory: the per-step losses of the first steps differ from the one-device run's.
        first = {w: _curve_difference(losses(per_rank[w, False]), losses(per_rank[1, False])) for w in sizes[1:]}
        checks = [
            Check(f"fixed global batch {GLOBAL_BATCH}: W={', '.join(map(str, sizes[1:]))} deviate from W=1 by "
                  f"{', '.join(sci(dev_fixed[w]) for w in sizes[1:])} (<= {EQUAL:.0e})",
                  all(at_most(dev_fixed[w], EQUAL) for w in sizes[1:])),
            Check(f"fixed {PER_RANK} per rank: the loss curves of W={', '.join(map(str, sizes[1:]))} differ from W=1's "
                  f"by {', '.join(sci(first[w]) for w in sizes[1:])} (>= {DIFFERENT:.0e})",
                  all(at_least(first[w], DIFFERENT) for w in sizes[1:])),
            *[Check(f"W={w}, after {samples} samples: loss {lag[w, False]:.3g}x one device's with the lr unchanged, "
                    f"{lag[w, True]:.3g}x with lr x{w} (closer)", _closer(lag[w, True], lag[w, False]))
              for w in sizes[1:]],
        ]
        summary = (f"With the global batch fixed at {GLOBAL_BATCH}, W={', '.join(map(str, sizes))} are one run "
                   f"(largest deviation {sci(max(dev_fixed.values()))}); with {PER_RANK} samples per rank the batch "
                   f"grows with W, and after the same {samples} samples W={top} reaches {lag[top, False]:.3g}x the "
                   f"one-device loss at the same lr but {lag[top, True]:.3g}x with the lr scaled by {top}.")
        fixed_table = [["fixed global batch", "W", "per-rank slices", "final loss", "deviation from W=1"]]
        for w in sizes:
            slices = "+".join([str(GLOBAL_BATCH // w)] * w)
            fixed_table.append([f"B={GLOBAL_BATCH}", str(w), slices, f"{losses(fixed[w])[-1]:.6f}",
                                "-" if w == 1 else sci(dev_fixed[w])])
        per_rank_table = [["fixed per-rank batch", "W", "lr", "steps", f"full-data loss after {samples} samples",
                           "vs one device"]]
        for (w, scaled), d in per_rank.items():
            per_rank_table.append([f"B={PER_RANK * w}", str(w), f"{BASE_LR * w if scaled else BASE_LR:g}",
                                   str(len(losses(d))), f"{ev[w, scaled]:.4f}", f"{lag[w, scaled]:.3g}x"])
        plots = [_plot(out, fixed, per_rank, ev, sizes, steps, top)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary,
            tables=[fixed_table, per_rank_table], plots=plots,
            experiment=(f"An MLP (float64, SGD with momentum). Fixed global batch: B={GLOBAL_BATCH}, lr {fixed_lr:g}, "
                        f"{steps} steps, with W={', '.join(map(str, sizes))} processes. Fixed per-rank batch: "
                        f"{PER_RANK} samples per rank (B={', '.join(str(PER_RANK * w) for w in sizes)}), each run "
                        f"{samples} samples in all, at lr {BASE_LR:g} and at lr {BASE_LR:g} x W; loss of the final "
                        "model on the whole dataset."),
            numbers={"world_sizes": sizes, "deviation_fixed_global": {str(w): v for w, v in dev_fixed.items()},
                     "curve_difference_fixed_per_rank": {str(w): v for w, v in first.items()},
                     "full_data_loss": {f"w{w}{'_scaled' if s else ''}": v for (w, s), v in ev.items()},
                     "relative_to_one_device": {f"w{w}{'_scaled' if s else ''}": v for (w, s), v in lag.items()},
                     "samples": samples})

    return finish


def _curve_difference(a: list[float], b: list[float]) -> float:
    """max|a - b| / max|b| over the steps both curves have."""
    n = min(len(a), len(b))
    return max(abs(x - y) for x, y in zip(a[:n], b[:n])) / max(abs(y) for y in b[:n])


def _closer(scaled: float, unscaled: float) -> bool:
    """The scaled run's loss ratio to one device is nearer 1 (on a log scale) than the unscaled run's."""
    import math

    return abs(math.log(scaled)) < abs(math.log(unscaled))


def _plot(out: Path, fixed: dict, per_rank: dict, ev: dict, sizes: list[int], steps: int, top: int) -> str:
    fig, (fixed_ax, rank_ax, bar_ax) = new_figure(3, (15.0, 4.2))
    colors = {1: "black", 2: "#2ca02c", 4: "#9467bd"}
    for w in sizes:
        curve = losses(fixed[w])
        style = ONE_DEVICE if w == 1 else {"color": colors.get(w, "#8c564b"), "linestyle": LINE.get(w, "-."),
                                          "linewidth": 2, "zorder": 3}
        fixed_ax.plot(range(1, len(curve) + 1), curve, **{**style, "label": f"W={w}"})
    loss_axes(fixed_ax, f"fixed global batch B={GLOBAL_BATCH}")
    # Per-rank runs against samples seen; each point is the mean loss over 8 * top samples, so every run's
    # curve is averaged over the same amount of data (one step of the largest batch).
    for (w, scaled), d in per_rank.items():
        curve = losses(d)
        group = top // w
        points = [sum(curve[i:i + group]) / group for i in range(0, len(curve), group)]
        x = [PER_RANK * top * (i + 1) for i in range(len(points))]
        label = f"W={w}, B={PER_RANK * w}, lr {'x' + str(w) if scaled else 'unchanged'}"
        style = ({**ONE_DEVICE, "label": f"W=1, B={PER_RANK}"} if w == 1 else
                 {"color": colors.get(w, "#8c564b"), "linestyle": "-" if scaled else ":", "linewidth": 1.8,
                  "label": label})
        rank_ax.plot(x, points, **style)
    loss_axes(rank_ax, f"fixed {PER_RANK} samples per rank", xlabel="samples seen")
    keys = list(per_rank)
    labels = ["W=1" if w == 1 else f"W={w}\nlr x{w}" if s else f"W={w}\nlr same" for w, s in keys]
    bar_ax.bar(range(len(keys)), [ev[k] for k in keys],
               color=["#7f7f7f" if w == 1 else colors.get(w, "#8c564b") for w, _ in keys],
               alpha=1.0, hatch=None)
    bar_ax.set_xticks(range(len(keys)), labels)
    axes(bar_ax, f"full-data loss after {PER_RANK * top * steps} samples", xlabel="run", ylabel="loss", log=True,
         legend=False)
    label_bars(bar_ax, range(len(keys)), [ev[k] for k in keys], [f"{ev[k]:.3g}" for k in keys], log=True)
    return save(fig, out, "scaling.png")

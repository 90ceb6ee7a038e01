"""Does mixed precision break the equivalence?

The same MLP and global batches (uneven slices), trained in fp32, under bf16 autocast and under fp16 autocast with
loss scaling (float32 master weights in all three), each by W processes and by one process. Per precision: the
deviation of the W-process run from the one-process run (what ``disttrain verify`` measures, judged against that
precision's whole-run tolerance), and the distance of the one-process run from the fp32 one (what low precision
itself changes): distributing must cost little against that. fp16 starts from a loss scale too large on purpose, so
its first steps overflow and are skipped: the scale halves until the gradients fit, then grows again every few
finite steps; every rank takes the same decisions, made on the reduced gradient (precision.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataclasses import replace

from ..config.parse import config_from_dict
from ..parallel.env import DistEnv
from ..verify.twin import RANK_ORDER, SAMPLE_ORDER, train_reference
from ..verify.verdict import NOT_EQUIVALENT
from ..verify.whole import compare_runs, run_tolerance
from .common import Check, Lab, Result, at_most, config, deviation, losses, metric, sci
from .figures import ONE_DEVICE, axes, label_bars, legend_beside, loss_axes, marked, new_figure, save

NAME = "precision"
QUESTION = "Does mixed precision (bf16, fp16 with loss scaling) break the equivalence with one device?"
CLAIM = ("in fp32 verify finds the W-process run EQUIVALENT to one device; in bf16 and fp16 its deviation from one "
         "device is at most a fifth of what the precision itself changes (the one-device run's distance from fp32), "
         "and verify's calibrated verdict is never NOT EQUIVALENT; fp16 skips the same steps on W processes as on one "
         "device")
FRACTION = 0.2  # "small against the precision's own effect"
PRECISIONS = ("fp32", "bf16", "fp16")
COLORS = {"fp32": "#1f77b4", "bf16": "#2ca02c", "fp16": "#d62728"}
LINES = {"fp32": "-", "bf16": "--", "fp16": ":"}
INIT_SCALE = 2.0 ** 24  # too large for these gradients: the first fp16 steps overflow


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w = lab.settings.nproc
    steps, growth = (10, 3) if lab.settings.quick else (40, 8)
    batch = 8 * w - 1  # uneven slices: 8, 8, 8, 7 over 4 ranks
    base = ["model.name=mlp", "model.hidden=64", "train.dtype=float32", f"train.steps={steps}", "optim.lr=0.05",
            f"train.global_batch_size={batch}", f"train.loss_scale={INIT_SCALE!r}",
            f"train.loss_scale_growth_interval={growth}"]
    runs = out / "runs"
    dist = {p: lab.train(runs / f"{p}_w{w}", config(*base, f"train.precision={p}"), w) for p in PRECISIONS}
    # One device on the same global batches, as verify trains it (its reference, reading each batch as the W ranks
    # do), and the reference's rounding twin: its distance is the run's own rounding noise (verify/twin.py).
    one = {p: runs / f"{p}_one" for p in PRECISIONS}
    twin = {p: runs / f"{p}_twin" for p in PRECISIONS}
    twin2 = {p: runs / f"{p}_twin2" for p in PRECISIONS}
    for p in PRECISIONS:
        cfg = config(*base, f"train.precision={p}")
        for run_dir, kind in ((one[p], None), (twin[p], RANK_ORDER), (twin2[p], SAMPLE_ORDER)):
            lab.call(1, reference_task, replace(cfg, train=replace(cfg.train, out_dir=str(run_dir))).to_dict(), w,
                     kind)

    def finish() -> Result:
        dev = {p: deviation(dist[p], one[p]) for p in PRECISIONS}
        tol = {p: run_tolerance("float32", p) for p in PRECISIONS}
        reports = {p: compare_runs(config(*base, f"train.precision={p}"), dist[p], one[p], twin[p],
                                    twin2[p]) for p in PRECISIONS}
        verdict = {p: reports[p].verdict for p in PRECISIONS}
        noise = {p: max(reports[p].loss_noise, reports[p].param_noise) for p in PRECISIONS}
        from_fp32 = {p: deviation(one[p], one["fp32"]) for p in ("bf16", "fp16")}
        skipped_w, skipped_one = _skipped_steps(dist["fp16"]), _skipped_steps(one["fp16"])
        scales = metric(dist["fp16"], "loss_scale")
        checks = [Check(f"fp32: verify's verdict {verdict['fp32']} (deviation {sci(dev['fp32'])}, rounding noise "
                        f"{sci(noise['fp32'])})", verdict["fp32"] == "EQUIVALENT")]
        checks += [Check(f"{p}: deviation from one device {sci(dev[p])} <= {FRACTION:g} x distance from fp32 "
                         f"{sci(from_fp32[p])}", at_most(dev[p], FRACTION * from_fp32[p])) for p in ("bf16", "fp16")]
        checks += [Check(f"{p}: verify's calibrated verdict {verdict[p]}, not NOT EQUIVALENT (deviation {sci(dev[p])}, "
                         f"rounding noise {sci(noise[p])})", verdict[p] != NOT_EQUIVALENT) for p in ("bf16", "fp16")]
        checks += [Check(f"fp16: skipped steps {skipped_w} on W={w} == {skipped_one} on one device, at least one",
                         skipped_w == skipped_one and len(skipped_w) >= 1)]
        within = {p: at_most(dev[p], tol[p]) for p in PRECISIONS}
        summary = (f"Mixed precision does not break it: on B={batch} over W={w}, the W-process run deviates from one "
                   f"device by {sci(dev['fp32'])} "
                   f"in fp32, {sci(dev['bf16'])} in bf16 and {sci(dev['fp16'])} in fp16, against the "
                   f"{sci(from_fp32['bf16'])} (bf16) and {sci(from_fp32['fp16'])} (fp16) that low precision itself "
                   f"moves one device's run; fp16 skipped steps {skipped_w} on every rank, as one device did, and its "
                   f"scale went from {INIT_SCALE:g} to {scales[-1]:g}. Whole-run verify, calibrated by each run's "
                   "rounding twin: " + ", ".join(f"{p} {verdict[p]}" for p in PRECISIONS) + "."
                   + (" INCONCLUSIVE: the precision's own rounding over this run is as large as the smallest known "
                      "mistake, so whole-run verify cannot rule one out (step-wise verification with short segments "
                      "can)." if "INCONCLUSIVE" in verdict.values() else ""))
        table = [["precision", f"deviation W={w} vs one", "rounding noise (twin)", "verify's bound: loss / parameters",
                  "verify verdict", "one device: distance from fp32", "skipped steps", "final loss",
                  "fixed tolerance (uncalibrated)"]]
        for p in PRECISIONS:
            bound = f"{sci(reports[p].loss_bound)} / {sci(reports[p].param_bound)}"
            table.append([p, sci(dev[p]), sci(noise[p]), bound,
                          verdict[p],
                          "-" if p == "fp32" else sci(from_fp32[p]), str(metric(dist[p], "skipped")[-1]),
                          f"{losses(dist[p])[-1]:.4f}", f"{tol[p]:.0e}"])
        bounds = {p: (reports[p].loss_bound, reports[p].param_bound) for p in PRECISIONS}
        plots = [_plot(out, dist, one, dev, from_fp32, w, batch, bounds)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"An MLP (float32 weights, SGD with momentum at lr 0.05, {steps} steps, B={batch}) trained in "
                        f"fp32, bf16 and fp16 (autocast; fp16 with a loss scale starting at {INIT_SCALE:g} and "
                        f"doubling every {growth} finite steps) by W={w} processes and by one process on the same "
                        "global batches. Deviation: the largest relative difference of the loss curve and the final "
                        "parameters, as disttrain verify measures it."),
            numbers={"world_size": w, "global_batch_size": batch, "deviation": dev, "tolerance": tol,
                     "within_verify_tolerance": within, "verdict": verdict, "rounding_noise": noise,
                     "distance_from_fp32": from_fp32, "fp16_skipped_steps": skipped_w,
                     "fp16_skipped_steps_one_device": skipped_one, "fp16_loss_scale": scales,
                     "final_loss": {p: losses(dist[p])[-1] for p in PRECISIONS}})

    return finish


def reference_task(env: DistEnv, cfg_dict: dict, ranks: int, twin: str | None) -> None:
    """verify's one-device reference of a ``ranks``-rank run, or one of its rounding twins (verify/twin.py), in this
    process."""
    train_reference(config_from_dict(cfg_dict), env, ranks, twin)


def _skipped_steps(run_dir: Path) -> list[int]:
    """The steps whose optimizer step was skipped (the cumulative count in metrics.jsonl went up)."""
    counts = [0, *metric(run_dir, "skipped")]
    return [s for s in range(len(counts) - 1) if counts[s + 1] > counts[s]]


def _plot(out: Path, dist: dict[str, Path], one: dict[str, Path], dev: dict[str, float],
          from_fp32: dict[str, float], w: int, batch: int, bounds: dict[str, tuple[float, float]]) -> str:
    curves = {p: (losses(dist[p]), losses(one[p])) for p in PRECISIONS}
    fp16 = {f"W={w}": (metric(dist["fp16"], "loss_scale"), _skipped_steps(dist["fp16"])),
            "one device": (metric(one["fp16"], "loss_scale"), _skipped_steps(one["fp16"]))}
    return save(figure(curves, fp16, dev, from_fp32, w, batch, bounds), out, "precision.png")


def figure(curves: dict[str, tuple[list[float], list[float]]], fp16: dict[str, tuple[list[float], list[int]]],
           dev: dict[str, float], from_fp32: dict[str, float], w: int, batch: int,
           bounds: dict[str, tuple[float, float]] | None = None) -> Any:
    """Four panels on two rows, each legend beside its panel. ``curves``: per precision, the loss per step of the
    W-process run and of one device; ``fp16``: per run (W first), its loss scale per step and skipped steps;
    ``bounds``: per precision, verify's calibrated bounds (loss, parameters): max(C x rounding noise, floor), drawn
    as dashes (None: the fixed tolerances, as ``verify --uncalibrated`` judges)."""
    kind = "tolerance" if bounds is None else "bound"
    if bounds is None:
        bounds = {p: (run_tolerance("float32", p),) * 2 for p in curves}
    from matplotlib.lines import Line2D

    fig, (loss_ax, gap_ax, scale_ax, bars) = new_figure(2, (14.0, 8.4), nrows=2)
    # fp32 and bf16 lie within 1e-2 of each other in the loss: each precision has its own line style and marker.
    styles = {p: marked(i, len(curves[p][0]), color=COLORS[p], linestyle=LINES[p], zorder=3)
              for i, p in enumerate(curves)}
    for p, (curve, ref) in curves.items():
        steps = range(1, len(curve) + 1)
        loss_ax.plot(steps, curve, **styles[p])
        loss_ax.plot(steps, ref, **{**ONE_DEVICE, "color": COLORS[p]})
        scale = max(abs(v) for v in ref)
        # A step where the two losses are equal has no place on a log axis: the line breaks there.
        gap_ax.plot(steps, [abs(a - b) / scale if a != b else float("nan") for a, b in zip(curve, ref)],
                    color=COLORS[p], label=p)
        gap_ax.axhline(bounds[p][0], color=COLORS[p], linestyle="--", linewidth=1,
                       label=f"{p}: verify's loss {kind} {bounds[p][0]:.1e}")
    loss_axes(loss_ax, f"loss per step, B={batch} over W={w}")
    legend_beside(loss_ax, [Line2D([], [], **{k: v for k, v in styles[p].items() if k != "markevery"},
                                   label=f"W={w}, {p}") for p in curves]
                  + [Line2D([], [], **{**ONE_DEVICE, "color": "grey"})])
    axes(gap_ax, f"W={w} vs one device, per step (equal: no point)", ylabel="|loss - one device| / max loss",
         log=True, legend=False)
    legend_beside(gap_ax)
    for label, (scales, skipped) in fp16.items():
        one_device = label == "one device"
        style = {k: v for k, v in ONE_DEVICE.items() if k != "label"} if one_device else {"color": COLORS["fp16"],
                                                                                          "zorder": 3}
        scale_ax.step(range(1, len(scales) + 1), scales, where="mid", label=label, **style)
        scale_ax.scatter([s + 1 for s in skipped], [scales[s] for s in skipped], zorder=4, label=f"{label}: skipped",
                         **({"marker": "o", "s": 110, "facecolors": "none", "edgecolors": "grey"} if one_device else
                            {"marker": "x", "s": 50, "color": "black"}))
    axes(scale_ax, "fp16 loss scale (marked: step skipped, overflow)", ylabel="loss scale", log=True, legend=False)
    legend_beside(scale_ax)
    _bars(bars, dev, from_fp32, w, bounds, kind)
    return fig


def _bars(ax, dev: dict[str, float], from_fp32: dict[str, float], w: int, bounds: dict[str, tuple[float, float]],
          kind: str) -> None:
    """Per precision: W vs one device (a bar: the larger of the loss curve's and the parameters' deviation;
    verify's loss and parameter bounds as a dash over its left half and a dotted line over its right half), and one
    device's distance from fp32."""
    labels, values, colors = [], [], []
    for p in PRECISIONS:
        labels.append(f"{p}\nW={w}\nvs 1")
        values.append(dev[p])
        colors.append(COLORS[p])
    for p in ("bf16", "fp16"):
        labels.append(f"{p}\nvs fp32\n(1 device)")
        values.append(from_fp32[p])
        colors.append("#7f7f7f")
    shown = [max(v, 1e-17) for v in values]
    ax.bar(range(len(values)), shown, color=colors, width=0.6)
    for i, p in enumerate(PRECISIONS):
        # side by side over the bar (left: loss, right: parameters), so that equal bounds do not hide each other
        for j, (what, line) in enumerate((("loss curve", "--"), ("parameters", ":"))):
            ax.hlines(bounds[p][j], i - 0.4 + 0.4 * j, i + 0.4 * j, color="black", linestyle=line, linewidth=1.6,
                      label=f"{what}: verify's {kind}" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_ylim(min(shown) / 30, max(shown + [b for pair in bounds.values() for b in pair]) * 30)
    label_bars(ax, range(len(values)), shown, [sci(v) for v in values], log=True)
    ax.set_xticks(range(len(values)), labels, fontsize="small")
    ax.set_title("largest deviation (loss curve, final parameters)"
                 + ("\nverify's bound: max(4 x rounding noise, floor)" if kind == "bound" else ""))
    ax.set_ylabel("max relative difference")
    ax.grid(alpha=0.3, axis="y")
    legend_beside(ax)

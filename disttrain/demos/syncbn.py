"""Why sync BatchNorm, and why one exchange is enough.

(a) Per-rank batch size. W processes train an MLP with BatchNorm on 2, 4, 8 and 16 samples per rank: with
    per-rank BatchNorm (``model.norm: bn``, each rank normalises its own slice), with disttrain's
    SyncBatchNorm (statistics over the global batch), and one process on the whole global batch. The trained
    models are evaluated (eval mode: running statistics) on the whole dataset.
(b) Collectives per layer call and time, forward + backward, for the layers of ``disttrain bench syncbn``:
    disttrain's single-pass SyncBatchNorm (both of its collective schemes), the classic two-pass SyncBN, the
    all_gather + Chan scheme torch uses on GPUs, and local BatchNorm. Collectives are counted as the c10d
    operations the layer dispatches; times are the benchmark's own measurement.
(c) Numerics. On float32 data with mean 1e4 and standard deviation 1e-2, the variance from the naive
    single-pass formula E[x^2] - E[x]^2, from torch's BatchNorm2d (one process) and from disttrain's
    SyncBatchNorm (W processes), against a float64 two-pass reference.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..data.batching import local_slice
from ..parallel.env import DistEnv
from ..parallel.syncbn import COLLECTIVES, SyncBatchNorm, collective_for
from .common import DIFFERENT, EQUAL, Check, Lab, Result, at_least, at_most, config, deviation, evaluate, sci
from .figures import COLORS, ONE_DEVICE, axes, label_bars, new_figure, save

# The SyncBN benchmark's layers and timing loop (`disttrain bench syncbn`): the demo measures with its code.
from ..bench.common import time_calls as _time_calls
from ..bench.syncbn import implementations


def time_calls(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, n: int) -> list[float]:
    """Seconds per forward+backward call of ``layer``, as the syncbn benchmark times it."""
    return _time_calls(lambda: layer(x).backward(dy), n)


NAME = "syncbn"
QUESTION = "Why does BatchNorm need syncing across processes, and how can one exchange be enough?"
CLAIM = ("SyncBatchNorm equals one device at every per-rank batch size while per-rank BatchNorm does not and "
         "degrades as the per-rank batch shrinks; disttrain's SyncBatchNorm needs one collective each way (two "
         "per layer call, the two-pass scheme four) and its variance stays accurate where E[x^2]-E[x]^2 fails")
PER_RANK = (2, 4, 8, 16)
CHANNELS, BENCH_SHAPE = 64, (16, 64, 16, 16)  # per-rank input of the timing: ResNet-like activations
NUMERICS_SHAPE, MEAN, STD = (8, 16, 8, 8), 1e4, 1e-2  # per rank


def scheme_label(scheme: str, backend: str) -> str:
    """disttrain's SyncBatchNorm with one of its two collectives, named with the backend it ran on here and whether
    that backend chooses it (on NCCL it is all_reduce, on gloo all_gather)."""
    return f"disttrain ({scheme} on {backend}{', its default' if collective_for(backend) == scheme else ''})"


def layer_label(name: str, backend: str) -> str:
    """A layer of the syncbn benchmark as the demo's table and figure name it: disttrain's with its collective."""
    if name == "disttrain":
        return scheme_label(collective_for(backend), backend)
    if name == "disttrain all_reduce":
        return scheme_label("all_reduce", backend)
    return name


class _CountCollectives(TorchDispatchMode):
    """Counts the c10d collectives dispatched inside the block (all_reduce, all_gather, ...), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.ops[func.name().split("::")[-1].rstrip("_")] += 1
        return func(*args, **(kwargs or {}))


def collectives_task(env: DistEnv, iters: int) -> dict[str, dict[str, Any]]:
    """On every rank: each benchmark layer's collectives (forward, backward), median ms per call and the backend
    it ran on."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(env.rank)
    x = torch.randn(BENCH_SHAPE, generator=g).requires_grad_()
    dy = torch.randn(BENCH_SHAPE, generator=g)
    layers = {name: make(CHANNELS) for name, make in implementations().items()}
    out: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        with _CountCollectives() as fwd:
            y = layer(x)
        with _CountCollectives() as bwd:
            y.backward(dy)
        time_calls(layer, x, dy, 3)  # warm-up
        out[name] = {"forward": sum(fwd.ops.values()), "backward": sum(bwd.ops.values()),
                     "ops": dict(fwd.ops + bwd.ops), "times": [], "backend": str(env.backend)}
    # Interleaved rounds, as the benchmark does, so that load from elsewhere hits every layer alike.
    for _ in range(3):
        for name, layer in layers.items():
            out[name]["times"] += time_calls(layer, x, dy, max(iters // 3, 1))
    for entry in out.values():
        entry["ms"] = 1e3 * statistics.median(entry.pop("times"))
    return out


def numerics_data(world_size: int) -> torch.Tensor:
    """The global batch of (c): float32, mean 1e4, standard deviation 1e-2, seeded."""
    g = torch.Generator().manual_seed(0)
    n, *rest = NUMERICS_SHAPE
    return (MEAN + STD * torch.randn(world_size * n, *rest, generator=g, dtype=torch.float64)).float()


def variance_task(env: DistEnv) -> dict[str, list[float]]:
    """disttrain's SyncBatchNorm on this rank's slice of the global batch: the unbiased variance it computes
    (running_var after one step with momentum 1), for both of its collective schemes, by label (scheme_label)."""
    x = numerics_data(env.world_size)[local_slice(env.world_size * NUMERICS_SHAPE[0], env.world_size, env.rank)]
    out = {}
    for scheme in COLLECTIVES:
        layer = SyncBatchNorm(NUMERICS_SHAPE[1], momentum=1.0)
        layer.collective = scheme
        layer(x)
        out[scheme_label(scheme, str(env.backend))] = layer.running_var.double().tolist()
    return out


def reference_variances(world_size: int) -> dict[str, torch.Tensor]:
    """Unbiased per-channel variances of the global batch: float64 two-pass, naive single-pass, torch BN."""
    x = numerics_data(world_size)
    dims = [0, 2, 3]
    n = x.numel() // x.shape[1]
    exact = x.double().var(dim=dims, correction=1)
    # What a single exchange of (sum x, sum x^2) per rank gives: float32 sums over the slices, then the formula.
    slices = [x[local_slice(len(x), world_size, r)] for r in range(world_size)]
    s1 = sum(s.sum(dims) for s in slices)
    s2 = sum((s * s).sum(dims) for s in slices)
    naive = (s2 / n - (s1 / n) ** 2) * n / (n - 1)
    bn = nn.BatchNorm2d(x.shape[1], momentum=1.0)
    bn(x)
    return {"exact": exact, "naive": naive.double(), "torch": bn.running_var.double()}


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value - exact).abs() / exact).max().item()


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w, quick = lab.settings.nproc, lab.settings.quick
    steps = 15 if quick else 30
    runs = out / "runs"
    base = ["model.name=mlp", "model.hidden=64", "train.dtype=float64", f"train.steps={steps}", "optim.lr=0.05"]
    dirs: dict[tuple[int, str], Path] = {}
    for b in PER_RANK:
        cfg = [*base, f"train.global_batch_size={w * b}"]
        dirs[b, "bn"] = lab.train(runs / f"bn_{b}", config(*cfg, "model.norm=bn"), w)
        dirs[b, "syncbn"] = lab.train(runs / f"syncbn_{b}", config(*cfg, "model.norm=syncbn"), w)
        dirs[b, "one"] = lab.train(runs / f"one_device_{b}", config(*cfg, "model.norm=bn"), 1)
    exchange = lab.call(w, collectives_task, 12 if quick else 45)
    variances = lab.call(w, variance_task)

    def finish() -> Result:
        ev = {key: evaluate(d) for key, d in dirs.items()}
        dev = {(b, k): deviation(dirs[b, k], dirs[b, "one"]) for b in PER_RANK for k in ("bn", "syncbn")}
        gap = {b: ev[b, "bn"][0] - ev[b, "one"][0] for b in PER_RANK}  # eval loss above one device's
        small, large = PER_RANK[0], PER_RANK[-1]
        coll = exchange.value
        ref = reference_variances(w)
        errors = {"naive E[x^2]-E[x]^2": relative_error(ref["naive"], ref["exact"]),
                  "torch BatchNorm2d": relative_error(ref["torch"], ref["exact"]),
                  **{label: relative_error(torch.tensor(v, dtype=torch.float64), ref["exact"])
                     for label, v in variances.value.items()}}
        backend = coll["disttrain"]["backend"]
        ours = errors[layer_label("disttrain", backend)]  # the scheme SyncBatchNorm chooses on this backend
        checks = [
            Check(f"SyncBN deviation from one device {sci(max(dev[b, 'syncbn'] for b in PER_RANK))} <= {EQUAL:.0e} "
                  f"at every per-rank batch", all(at_most(dev[b, "syncbn"], EQUAL) for b in PER_RANK)),
            Check(f"per-rank BN deviation >= {DIFFERENT:.0e} at every per-rank batch (smallest "
                  f"{sci(min(dev[b, 'bn'] for b in PER_RANK))})", all(at_least(dev[b, "bn"], DIFFERENT) for b in PER_RANK)),
            Check(f"per-rank BN's eval loss exceeds one device's by {gap[small]:.3g} at {small}/rank, more than the "
                  f"{gap[large]:.3g} at {large}/rank", gap[small] > max(gap[large], 0.0)),
            Check(f"collectives per layer call: disttrain {_calls(coll['disttrain'])}, two-pass "
                  f"{_calls(coll['two-pass'])}",
                  (coll["disttrain"]["forward"], coll["disttrain"]["backward"]) == (1, 1)
                  and (coll["two-pass"]["forward"], coll["two-pass"]["backward"]) == (2, 2)),
            Check(f"variance error: disttrain on {backend} {sci(ours)} <= 1e-05, naive {sci(errors['naive E[x^2]-E[x]^2'])} >= 1e-01",
                  at_most(ours, 1e-5) and at_least(errors["naive E[x^2]-E[x]^2"], 1e-1)),
        ]
        summary = (f"SyncBatchNorm equals one device at 2 to 16 samples per rank (deviation <= "
                   f"{sci(max(dev[b, 'syncbn'] for b in PER_RANK))}), while per-rank BatchNorm deviates and its eval "
                   f"accuracy falls to {ev[small, 'bn'][1]:.0%} at {small}/rank (one device: {ev[small, 'one'][1]:.0%}); "
                   f"one exchange each way ({_calls(coll['disttrain'])} collectives per layer call, "
                   f"{coll['disttrain']['ms']:.1f} ms, against {_calls(coll['two-pass'])} and "
                   f"{coll['two-pass']['ms']:.1f} ms two-pass) with a variance error of {sci(ours)} where the naive "
                   f"formula's is {sci(errors['naive E[x^2]-E[x]^2'])}.")
        batch_table = [["per rank", "global B", "per-rank BN loss / acc", "SyncBN loss / acc", "one device loss / acc",
                        "BN deviation", "SyncBN deviation"]]
        for b in PER_RANK:
            batch_table.append([str(b), str(w * b), *(f"{ev[b, k][0]:.4f} / {ev[b, k][1]:.1%}"
                                                      for k in ("bn", "syncbn", "one")),
                                sci(dev[b, "bn"]), sci(dev[b, "syncbn"])])
        exchange_table = [["layer (forward + backward)", "collectives", "which", "ms per call"]]
        for name, entry in coll.items():
            exchange_table.append([layer_label(name, entry["backend"]), _calls(entry), ", ".join(f"{v} {k}" for k, v in entry["ops"].items()) or "-",
                                   f"{entry['ms']:.2f}"])
        error_table = [["variance computed by", "relative error"]] + [[k, sci(v)] for k, v in errors.items()]
        plots = [_plot_batch(out, ev, dev, w), _plot_exchange(out, coll, errors, w)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary,
            tables=[batch_table, exchange_table, error_table], plots=plots,
            experiment=(f"(a) An MLP with BatchNorm (float64, {steps} steps) trained by W={w} processes with "
                        f"{', '.join(map(str, PER_RANK))} samples per rank, with per-rank BatchNorm and with "
                        "SyncBatchNorm, and by one process on the same global batches; eval-mode loss and accuracy "
                        f"on the whole dataset. (b) One layer call (forward + backward) on {w} processes, per-rank "
                        f"input {'x'.join(map(str, BENCH_SHAPE))}: the c10d collectives each SyncBN scheme issues, "
                        "and the median time of the benchmark's measurement. (c) The per-channel variance of float32 "
                        f"data with mean {MEAN:g} and std {STD:g} ({'x'.join(map(str, NUMERICS_SHAPE))} per rank) "
                        "against a float64 two-pass reference."),
            numbers={"world_size": w, "per_rank_batch": list(PER_RANK),
                     "eval": {k: {str(b): {"loss": ev[b, k][0], "accuracy": ev[b, k][1]} for b in PER_RANK}
                              for k in ("bn", "syncbn", "one")},
                     "deviation": {k: {str(b): dev[b, k] for b in PER_RANK} for k in ("bn", "syncbn")},
                     "collectives": coll, "variance_relative_error": errors})

    return finish


def _calls(entry: dict[str, Any]) -> str:
    return f"{entry['forward']}+{entry['backward']}"


def _plot_batch(out: Path, ev: dict, dev: dict, w: int) -> str:
    fig, (loss_ax, acc_ax, dev_ax) = new_figure(3, (15.0, 4.2))
    styles = {"bn": {"color": COLORS["bn"], "marker": "o", "label": "per-rank BatchNorm"},
              "syncbn": {"color": COLORS["syncbn"], "marker": "s", "linestyle": "--", "label": "SyncBatchNorm", "zorder": 3}}
    one = {k: v for k, v in ONE_DEVICE.items()}
    for key, style in (*styles.items(), ("one", one)):
        loss_ax.plot(PER_RANK, [ev[b, key][0] for b in PER_RANK], **style)
        acc_ax.plot(PER_RANK, [100 * ev[b, key][1] for b in PER_RANK], **style)
    for key in ("bn", "syncbn"):
        dev_ax.plot(PER_RANK, [max(dev[b, key], 1e-17) for b in PER_RANK], **styles[key])
    dev_ax.axhline(EQUAL, color="green", linestyle="--", linewidth=1, label=f"equal: <= {EQUAL:.0e}")
    for ax, title, ylabel in ((loss_ax, "eval loss after training", "loss"),
                              (acc_ax, "eval accuracy after training", "accuracy (%)"),
                              (dev_ax, "deviation from one device", "max relative difference")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(PER_RANK, [str(b) for b in PER_RANK])
        axes(ax, title, f"samples per rank (W={w})", ylabel, log=ax is not acc_ax)
    return save(fig, out, "syncbn_batch.png")


def _tick(label: str) -> str:
    """A table's label as a tick label of a few short lines: "disttrain\nall_gather\non gloo,\nits default"."""
    if label.startswith("disttrain ("):
        return label[len("disttrain ("):-1].replace(" on ", "\non ").replace(", its", ",\nits").join(("disttrain\n", ""))
    return label.replace(" ", "\n", 1)


def _plot_exchange(out: Path, coll: dict, errors: dict, w: int) -> str:
    fig, (count_ax, time_ax, err_ax) = new_figure(3, (15.0, 4.2))
    names = list(coll)
    labels = [_tick(layer_label(n, coll[n]["backend"])) for n in names]
    fwd = [coll[n]["forward"] for n in names]
    bwd = [coll[n]["backward"] for n in names]
    count_ax.bar(labels, fwd, color="#1f77b4", label="forward")
    count_ax.bar(labels, bwd, bottom=fwd, color="#aec7e8", label="backward")
    count_ax.set_title(f"collectives per layer call (W={w})")
    count_ax.yaxis.get_major_locator().set_params(integer=True)
    count_ax.legend(fontsize="small")
    time_ax.bar(labels, [coll[n]["ms"] for n in names], color="#7f7f7f")
    label_bars(time_ax, range(len(names)), [coll[n]["ms"] for n in names], [f"{coll[n]['ms']:.1f}" for n in names])
    time_ax.set_title("forward + backward, ms per call (median)")
    err_names = list(errors)
    err_ax.bar([_tick(n) for n in err_names], [max(errors[n], 1e-17) for n in err_names],
               color=["#d62728", "#ff7f0e", "#1f77b4", "#1f77b4"][: len(err_names)])
    err_ax.set_yscale("log")
    label_bars(err_ax, range(len(err_names)), [max(errors[n], 1e-17) for n in err_names],
               [sci(errors[n]) for n in err_names], log=True)
    err_ax.set_title(f"variance error, data mean {MEAN:g}, std {STD:g} (float32)")
    for ax, xlabel, ylabel in ((count_ax, "SyncBatchNorm scheme", "collectives"),
                               (time_ax, "SyncBatchNorm scheme", "ms per layer call"),
                               (err_ax, "variance computed by", "relative error")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize="small")
    return save(fig, out, "syncbn_exchange.png")

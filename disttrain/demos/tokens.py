"""With variable-length sequences, what does averaging mean? Token losses across ranks and micro-batches.

A gpt trains on real text of uneven length: paragraphs of a Python standard library module (every machine has
it), byte-level tokens, each paragraph a document cut into chunks of at most T + 1 tokens, so samples hold from
1 to T target tokens. W processes with accumulation 2 train on the same global batches four ways, and one
process on the whole global batch (the token mean, the objective):

- tokens: the summed token loss over the global count of target tokens (``comm.reduce: mean``): exact;
- avg: DDP's average of per-rank token means (``comm.reduce: avg``; transformers #34242);
- micro-batch means: each micro-batch's token mean, averaged over micro-batches and ranks
  (``train.token_weighting: micro_batch_mean``; transformers before PR #34191, the 2024 accumulation bug);
- sequence mean: each sequence's token mean, averaged over sequences (``train.token_weighting: sequence_mean``):
  exact across ranks against one device on the same objective, but another objective than the token mean.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.tokens import write_tokens
from .common import DIFFERENT, EQUAL, Check, Lab, Result, at_least, at_most, config, deviation, losses, sci
from .figures import ONE_DEVICE, axes, deviation_bars, loss_axes, marked, new_figure, save

NAME = "tokens"
QUESTION = "With variable-length sequences, what does averaging mean?"
CLAIM = ("only the global token-weighted mean equals one device; DDP's average of per-rank token means and the "
         "average of per-micro-batch means do not, and the per-sequence mean is exact only for its own objective")
SEQ_LEN = 32
SOURCE = "textwrap.py"  # a standard library module: real text, no download
WAYS = {  # name -> (overrides, what each rank contributes)
    "tokens": (["comm.reduce=mean"], "summed token loss / global token count"),
    "avg": (["comm.reduce=avg"], "its token mean, then / W (DDP)"),
    "micro_batch_mean": (["comm.reduce=avg", "train.token_weighting=micro_batch_mean"],
                         "mean of its micro-batches' token means, then / W"),
    "sequence_mean": (["train.token_weighting=sequence_mean"], "sum of sequence means / B"),
}
COLORS = {"tokens": "#1f77b4", "avg": "#ff7f0e", "micro_batch_mean": "#d62728", "sequence_mean": "#9467bd"}


def write_paragraphs(directory: Path) -> tuple[int, list[int]]:
    """The paragraphs (split at blank lines) of a standard library module as a token directory; their lengths."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / SOURCE).read_bytes()
    docs = [np.frombuffer(p.strip(b"\n"), dtype=np.uint8) for p in text.split(b"\n\n") if p.strip(b"\n")]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    write_tokens(directory, np.concatenate(docs), offsets, vocab_size=256)
    return len(docs), [len(d) for d in docs]


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w, k = lab.settings.nproc, 2
    steps = 6 if lab.settings.quick else 30
    batch = 8 * w - 2  # uneven slices too: 30 over 4 ranks
    documents, lengths = write_paragraphs(out / "data")
    base = ["data.name=tokens", f"data.path={out / 'data'}", f"data.seq_len={SEQ_LEN}", "model.name=gpt",
            "model.hidden=16", "model.kwargs={layers: 1, heads: 2}", "train.loss=token_cross_entropy",
            "train.dtype=float64", f"train.steps={steps}", f"train.global_batch_size={batch}", "optim.lr=0.1",
            "optim.weight_decay=0", "train.checkpoint_every=0"]
    runs = out / "runs"
    dist = {name: lab.train(runs / name, config(*base, f"train.accumulation_steps={k}", *over), w)
            for name, (over, _) in WAYS.items()}
    one = lab.train(runs / "one_device", config(*base), 1)
    one_seq = lab.train(runs / "one_device_sequence_mean", config(*base, "train.token_weighting=sequence_mean"), 1)

    def finish() -> Result:
        dev = {name: deviation(dist[name], one) for name in WAYS}
        dev_seq = deviation(dist["sequence_mean"], one_seq)
        checks = [
            Check(f"tokens: deviation from one device {sci(dev['tokens'])} <= {EQUAL:.0e}",
                  at_most(dev["tokens"], EQUAL)),
            *[Check(f"{name}: deviation from one device {sci(dev[name])} >= {DIFFERENT:.0e}",
                    at_least(dev[name], DIFFERENT)) for name in ("avg", "micro_batch_mean", "sequence_mean")],
            Check(f"sequence_mean against one device on the sequence mean: {sci(dev_seq)} <= {EQUAL:.0e}",
                  at_most(dev_seq, EQUAL)),
        ]
        summary = (f"Only the global token-weighted mean equals one device (deviation {sci(dev['tokens'])} at W={w}, "
                   f"accumulation {k}); DDP's average of per-rank token means is off by {sci(dev['avg'])}, the "
                   f"average of per-micro-batch means by {sci(dev['micro_batch_mean'])}. The per-sequence mean is "
                   f"{sci(dev['sequence_mean'])} from the token mean but {sci(dev_seq)} from one device on its own "
                   "objective: exact, and a different loss.")
        table = [["weighting", "each rank contributes", "deviation from one device", "final loss"]]
        table += [[name, WAYS[name][1], sci(dev[name]), f"{losses(dist[name])[-1]:.4f}"] for name in WAYS]
        table += [["sequence_mean", "vs one device on the sequence mean", sci(dev_seq),
                   f"{losses(one_seq)[-1]:.4f}"], ["one device", "whole global batch, token mean", "-",
                                                    f"{losses(one)[-1]:.4f}"]]
        plots = [_plot(out, dist, one, dev, dev_seq, w, k, batch)]
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table], plots=plots,
            experiment=(f"A gpt (width 16, 1 layer, float64, SGD with momentum, {steps} steps) on the {documents} "
                        f"paragraphs of the standard library's {SOURCE} as byte-level tokens ({min(lengths)} to "
                        f"{max(lengths)} tokens; chunks of at most {SEQ_LEN} targets), B={batch} over W={w} "
                        f"processes with accumulation {k}, each weighting against one process on the same global "
                        "batches. Deviation: the largest relative difference of the loss curve and the final "
                        "parameters, as disttrain verify measures it."),
            numbers={"world_size": w, "accumulation_steps": k, "global_batch_size": batch, "seq_len": SEQ_LEN,
                     "documents": documents, "deviation": {**dev, "sequence_mean_own_objective": dev_seq},
                     "final_loss": {**{n: losses(dist[n])[-1] for n in WAYS}, "one_device": losses(one)[-1]},
                     "equal_tolerance": EQUAL, "different_threshold": DIFFERENT})

    return finish


def _plot(out: Path, dist: dict[str, Path], one: Path, dev: dict[str, float], dev_seq: float, w: int, k: int,
          batch: int) -> str:
    fig, (ax, gap_ax, bars) = new_figure(3, (15.0, 4.2))
    ref = losses(one)
    scale = max(abs(v) for v in ref)
    # The four weightings move the loss by 1e-2 at most: each has its own marker on the left, and the middle panel
    # draws the differences from one device.
    for i, name in enumerate(WAYS):
        curve = losses(dist[name])
        label = f"W={w}, {name}" + (" (its own loss)" if name == "sequence_mean" else "")
        style = marked(i, len(curve), color=COLORS[name], label=label, zorder=3,
                       linestyle="--" if name == "tokens" else "-", linewidth=2.2 if name == "tokens" else 1.4)
        ax.plot(range(1, len(curve) + 1), curve, **style)
        gap_ax.plot(range(1, len(curve) + 1), [max(abs(a - b) / scale, 1e-17) for a, b in zip(curve, ref)], **style)
    ax.plot(range(1, len(ref) + 1), ref, **ONE_DEVICE)
    loss_axes(ax, f"logged loss per step, B={batch} over W={w}, accumulation {k}\n(the lines overlap: see the "
                  "middle panel)")
    gap_ax.axhline(EQUAL, color="green", linestyle="--", linewidth=1, label=f"equal: <= {EQUAL:.0e}")
    axes(gap_ax, "loss difference from one device (token mean)\n(an exact zero is drawn at 1e-17)",
         ylabel="|loss - one device| / max loss", log=True)
    labels = ["tokens", "avg", "micro-batch\nmeans", "sequence\nmean", "seq. mean,\nown loss"]
    values = [dev["tokens"], dev["avg"], dev["micro_batch_mean"], dev["sequence_mean"], dev_seq]
    deviation_bars(bars, labels, values, [*COLORS.values(), COLORS["sequence_mean"]],
                   "largest deviation from one device", "weighting of the token losses")
    return save(fig, out, "tokens.png")

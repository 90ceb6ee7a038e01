"""The look shared by the demos' figures (drawn with disttrain.plot's Agg figures)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..observe.plot import finite, new_figure, save_figure
from .common import DIFFERENT, EQUAL

__all__ = ["COLORS", "ONE_DEVICE", "axes", "deviation_bars", "finite", "label_bars", "legend_beside", "loss_axes",
           "marked", "new_figure", "save"]

COLORS = {"mean": "#1f77b4", "avg": "#ff7f0e", "sum": "#d62728", "max": "#9467bd", "bn": "#d62728",
          "syncbn": "#1f77b4", "none": "#d62728", "after": "#1f77b4", "before": "#ff7f0e", "warmup": "#1f77b4"}
ONE_DEVICE = {"color": "black", "linewidth": 4.0, "alpha": 0.25, "label": "one device", "zorder": 2}
FLOOR = 1e-17  # an exact zero on a log axis
MARKERS = ("o", "s", "^", "D", "v", "P")


def marked(index: int, points: int, **style: Any) -> dict[str, Any]:
    """``style`` with the ``index``-th series' own marker, placed on every few points and staggered by series, so
    that lines lying on top of each other (equal to the eye, different in the digits) each stay visible."""
    every = max(points // 8, 1)
    hollow = index % 2 == 0  # large hollow markers around small filled ones: both show where two series meet
    return {"marker": MARKERS[index % len(MARKERS)], "markevery": (index % every, every),
            "markersize": 9 if hollow else 4, "markeredgewidth": 1.5 if hollow else 1.0,
            "markerfacecolor": "none" if hollow else style.get("color"), **style}


def label_bars(ax: Any, positions: Sequence[float], heights: Sequence[float], texts: Sequence[str],
               log: bool = False) -> None:
    """Each bar's value above it, and room above the tallest label inside the frame."""
    for x, h, text in zip(positions, heights, texts):
        ax.annotate(text, (x, h), ha="center", va="bottom", fontsize="small", xytext=(0, 2),
                    textcoords="offset points")
    low, high = ax.get_ylim()
    top = max([h for h in heights if math.isfinite(h)], default=high)
    # about a tenth of the axis above the tallest bar, in the axis' own scale
    room = max(top / low, 10.0) ** 0.12 if log and low > 0 else 1.12
    ax.set_ylim(low, max(high, top * room))


def axes(ax: Any, title: str, xlabel: str | None = "step", ylabel: str | None = None, log: bool = False,
         legend: bool = True) -> None:
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def legend_beside(ax: Any, handles: Sequence[Any] | None = None) -> None:
    """The axes' legend to the right of its plotting area, where it covers no line (constrained layout makes
    room for it). ``handles``: the entries, when they are not the labelled artists."""
    args = () if handles is None else (handles, [h.get_label() for h in handles])
    ax.legend(*args, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def loss_axes(ax: Any, title: str, xlabel: str = "step") -> None:
    axes(ax, title, xlabel, "loss", log=True)


def save(fig: Any, out: Path, name: str) -> str:
    """Write the figure to out/name; the name is what the result and the report refer to."""
    save_figure(fig, out / name)
    return name


def deviation_bars(ax: Any, labels: Sequence[str], values: Sequence[float], colors: Sequence[str],
                   title: str, xlabel: str) -> None:
    """Relative deviations on a log axis, each bar labelled, with the 'equal' and 'different' thresholds."""
    top = max([v for v in values if math.isfinite(v)] + [1.0]) * 30
    shown = [min(max(v, FLOOR), top) if math.isfinite(v) else top for v in values]
    ax.bar(range(len(values)), shown, color=colors, width=0.6)
    for i, (v, s) in enumerate(zip(values, shown)):
        ax.annotate(f"{v:.1e}" if math.isfinite(v) else "diverged", (i, s), ha="center", va="bottom",
                    fontsize="small", xytext=(0, 2), textcoords="offset points")
    if any(v <= FLOOR for v in values):
        ax.annotate(f"an exact zero is drawn at {FLOOR:.0e}", (0.99, 0.01), xycoords="axes fraction", ha="right",
                    va="bottom", fontsize="x-small", color="#555")
    ax.axhline(EQUAL, color="green", linestyle="--", linewidth=1, label=f"equal: <= {EQUAL:.0e}")
    ax.axhline(DIFFERENT, color="red", linestyle=":", linewidth=1, label=f"different: >= {DIFFERENT:.0e}")
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 3, top * 10)
    ax.set_xticks(range(len(values)), labels)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("max relative difference")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left")

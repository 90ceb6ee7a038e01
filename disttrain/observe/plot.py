"""`disttrain plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`: loss, lr and gradient norm per step, runs overlaid.

Each run directory's metrics.jsonl (rank 0 writes every step: the global mean loss, the lr, the pre-clip
global gradient norm) becomes one line per panel. Figures are drawn with matplotlib's Agg backend directly
(no display, no global pyplot state); matplotlib is the ``demo`` extra, and without it a plot is a one-line
error naming the extra.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_OK, ConfigError, run_command
from .runlog import read_metrics

DPI = 100
RUN_PLOT_SIZE = (15.0, 4.0)  # inches: 1500 x 400 pixels at DPI


def new_figure(ncols: int, size: tuple[float, float], nrows: int = 1) -> tuple[Any, Any]:
    """A figure on its own Agg canvas and its axes (a flat list)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plots need matplotlib, the demo extra: pip install 'disttrain[demo]'") from None
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def require_matplotlib() -> None:
    """Fail early, before any training, when the plots could not be drawn."""
    new_figure(1, (1.0, 1.0))


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def finite(values: Sequence[float | None]) -> list[float]:
    """Non-finite (and missing) values become NaN: matplotlib leaves a gap instead of failing on a log axis."""
    return [v if v is not None and math.isfinite(v) else math.nan for v in values]


def plot_runs(run_dirs: Sequence[Path], out: Path) -> Path:
    """Loss, lr and gradient norm against the step, one line per run; written to ``out`` (PNG)."""
    runs = [(str(d), read_metrics(d)) for d in run_dirs]
    fig, (loss_ax, lr_ax, norm_ax) = new_figure(3, RUN_PLOT_SIZE)
    for label, records in runs:
        steps = [r["step"] + 1 for r in records]
        loss_ax.plot(steps, finite([r.get("loss") for r in records]), label=label)
        lr_ax.plot(steps, finite([r.get("lr") for r in records]), label=label)
        norm_ax.plot(steps, finite([r.get("grad_norm") for r in records]), label=label)
    for ax, title, ylabel in ((loss_ax, "loss (global mean)", "loss"), (lr_ax, "learning rate", "lr"),
                              (norm_ax, "gradient norm (before clipping)", "gradient norm")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in (loss_ax, norm_ax):
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata() if not math.isnan(v)):
            ax.set_yscale("log")
    loss_ax.legend(fontsize="small")
    return save_figure(fig, out)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (train.out_dir) holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("plot.png"), metavar="FILE.png",
                        help="where to write the PNG (default: plot.png)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "disttrain plot") -> int:
    args = _parser(prog).parse_args(argv)

    def command() -> int:
        if args.out.suffix.lower() != ".png":
            raise ConfigError(f"--out {args.out}: must be a .png file")
        try:
            out = plot_runs(args.run_dirs, args.out)
        except OSError as exc:
            raise ConfigError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
        print(f"wrote {out}")
        return EXIT_OK

    return run_command(command)

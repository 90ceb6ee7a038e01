"""Can a script disttrain has never seen be checked against one device? `disttrain check` on three small scripts.

Three plain-torch DDP scripts that ship in examples/, each checked at W ranks against one process on the global
batch with ``disttrain check`` (the library call the command makes): a correct loop (examples/check_ddp.py), a
language model whose loss is each rank's own token mean (examples/check_token_mean.py), and a loop with BatchNorm
that is not synchronised (examples/check_batchnorm.py). The check sees neither script's text: only the optimizer
steps, the training forwards' inputs and the modules that ran.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from ..check import CheckReport, run_check
from ..verify.verdict import EQUIVALENT, NOT_EQUIVALENT
from .common import Check, Lab, Result, sci
from .figures import axes, new_figure, save

NAME = "check"
QUESTION = "Can any training script be checked against one device?"
CLAIM = ("disttrain check calls a correct DDP script EQUIVALENT and the per-rank token mean and unsynchronised "
         "BatchNorm NOT EQUIVALENT, each with the cause computed from what it measured")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = {  # name -> (script, per-rank batch, colour, the hint that names the cause)
    "correct": ("check_ddp.py", 16, "#1f77b4", ""),
    "per-rank token mean": ("check_token_mean.py", 8, "#ff7f0e", "per-rank or per-micro-batch means"),
    "BatchNorm per rank": ("check_batchnorm.py", 16, "#d62728", "BatchNorm not synchronised"),
}


def plan(lab: Lab, out: Path) -> Callable[[], Result]:
    w = 2 if lab.settings.quick else min(lab.settings.nproc, 4)
    steps = 3 if lab.settings.quick else 8

    def finish() -> Result:
        reports: dict[str, CheckReport] = {}
        for name, (script, batch, _, _) in SCRIPTS.items():
            lab.log(f"  check: {script} at W={w}")
            reports[name] = run_check([str(EXAMPLES / script), "--batch", str(batch)], w, steps,
                                      f"--batch {batch * w}")
        checks = [Check(f"correct: {reports['correct'].verdict} (largest distance "
                        f"{sci(max(r.distance for r in reports['correct'].rows))})",
                        reports["correct"].verdict == EQUIVALENT)]
        for name, (_, _, _, words) in list(SCRIPTS.items())[1:]:
            r = reports[name]
            checks.append(Check(f"{name}: {r.verdict}, cause named ({words!r} in the hints)",
                                r.verdict == NOT_EQUIVALENT and any(words in h for h in r.hints)))
        table = [["script", "verdict", "first step beyond the bound", "largest distance", "cause (first hint)"]]
        for name, r in reports.items():
            table.append([name, r.verdict, str(r.first_beyond or "-"), sci(max(x.distance for x in r.rows)),
                          (r.hints[0] if r.hints else "-")[:90]])
        summary = (f"Without reading the scripts, disttrain check found the correct DDP loop EQUIVALENT at W={w} "
                   f"({sci(max(x.distance for x in reports['correct'].rows))} per step), the per-rank token mean "
                   f"{sci(max(x.distance for x in reports['per-rank token mean'].rows))} away from step "
                   f"{reports['per-rank token mean'].first_beyond} (its update non-uniform per tensor), and the "
                   f"per-rank BatchNorm {sci(max(x.distance for x in reports['BatchNorm per rank'].rows))} away "
                   "from step 1, each named in its cause line.")
        return Result(
            name=NAME, question=QUESTION, claim=CLAIM, checks=checks, summary=summary, tables=[table],
            plots=[_plot(out, reports, w)],
            experiment=(f"Three DDP scripts from examples/ (float64, SGD, {steps} steps), each run by disttrain check "
                        f"at W={w} ranks x b samples and as one process x W*b, the same script with --batch "
                        "changed: every optimizer step's parameters compared, and the samples each rank's training "
                        "forward took."),
            numbers={"world_size": w, "steps": steps, **{name: {
                "verdict": r.verdict, "first_beyond": r.first_beyond, "hints": r.hints,
                "distance": [x.distance for x in r.rows]} for name, r in reports.items()}})

    return finish


def _plot(out: Path, reports: dict[str, CheckReport], w: int) -> str:
    fig, (ax, text) = new_figure(2, (15.0, 4.2))
    for name, r in reports.items():
        colour = SCRIPTS[name][2]
        ax.plot([x.step for x in r.rows][1:], [max(x.distance, 1e-17) for x in r.rows][1:], marker="o",
                color=colour, label=f"{name}: {r.verdict}")
    ax.axhline(next(iter(reports.values())).bound, color="green", linestyle="--", linewidth=1,
               label="bound (float64 floor)")
    axes(ax, f"distance from one process per step, W={w}", ylabel="largest relative parameter difference",
         log=True, legend=False)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small", loc="center right")
    text.axis("off")
    lines = []
    for name, r in reports.items():
        lines.append(f"{name}: {r.verdict}")
        for hint in r.hints or ["nothing to explain"]:
            wrapped = textwrap.wrap(hint, 78)
            lines += [f"  {line}" for line in wrapped[:3]]
            if len(wrapped) > 3:
                lines[-1] += " ..."
        lines.append("")
    text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize="x-small", family="monospace",
              transform=text.transAxes)
    text.set_title("diagnosis (disttrain check's cause lines)")
    return save(fig, out, "check.png")

"""report.html: every demo's question, experiment, plots, numbers and conclusion in one self-contained page.

The plots are embedded as base64 PNG data URIs and the style is inline, so the file opens offline in any
browser and can be mailed or archived on its own; nothing is fetched from the network.

Each demo's part of the page is written beside its result.json (OUT/NAME/section.html), and the page is put
together from every part present in OUT: running one demo replaces its own section and keeps the others'.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

from .common import Result, Settings

SECTION = "section.html"  # a demo's part of report.html, in its own directory
TIMING = "timing.json"  # the last run into OUT: command, date, seconds, CPUs, load average (demos/__init__.py)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.verdict { padding: 0.6em 0.9em; border-radius: 4px; margin: 0.8em 0; }
.holds { background: #e9f6ec; border-left: 5px solid #2e7d32; }
.fails { background: #fdecea; border-left: 5px solid #c62828; }
.experiment { color: #444; } .muted { color: #777; font-size: 0.9em; }
ul.checks { font-size: 0.9em; color: #444; }
a { color: #1558b0; } dl.glossary dt { font-weight: bold; margin-top: 0.5em; } dl.glossary dd { margin-left: 1.5em; }
"""

# The words of the sections that are disttrain's own, each explained once (the page links here from its contents).
GLOSSARY = {
    "one device": "one process training on the whole global batch B of every step: what W processes must equal.",
    "deviation": "the largest relative difference, max|a - b| / max|b|, over the loss curve and every tensor of the "
                 "final parameters, as disttrain verify measures it; float64 runs that equal one device agree to "
                 "about 1e-15.",
    "rounding twin": "a second one-device run that differs from the reference only in the order its sums are "
                     "added (the ranks' slices in another order). Its distance from the reference is the run's own "
                     "rounding noise; verify's bound is max(4 x that noise, the dtype's floor), so a run is judged "
                     "against what rounding alone does to it.",
    "verify's bound": "the largest deviation verify accepts, for the loss curve and for the parameters separately: "
                      "max(4 x rounding noise, floor). The fixed tolerance (verify --uncalibrated) is the one number "
                      "per dtype used when no twin runs.",
    "1+1 collectives": "one collective in the forward pass and one in the backward pass of a layer call (2+2: two "
                       "each way, as the classic two-pass SyncBatchNorm needs: the mean first, then the variance).",
    "all_gather+Chan": "the SyncBatchNorm scheme torch uses on GPUs: every rank's (count, mean, M2) gathered, then "
                       "merged with Chan's parallel-variance formula; disttrain's all_gather scheme merges the same "
                       "way, its all_reduce scheme sums [n, n*mean, M2 + n*mean^2] instead.",
    "count-weighted mean": "each rank's summed loss divided by the global batch size, gradients summed over ranks: "
                           "exactly one device's gradient however the batch is split (DDP's average of per-rank "
                           "means is not, on uneven slices).",
}


_NUMBER = re.compile(r"^[-+]?(\d[\d.]*(e[-+]?\d+)?|inf|nan)(x|%)?( / [-+]?\d[\d.]*(e[-+]?\d+)?%?)?$")


def _cell(text: str) -> str:
    cls = ' class="num"' if _NUMBER.match(text) else ""
    return f"<td{cls}>{html.escape(text)}</td>"


def _table(rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _section(result: Result, demo_dir: Path, settings: Settings) -> str:
    verdict = "holds" if result.holds else "fails"
    mode = "quick settings" if settings.quick else "full settings"
    parts = [f'<h2 id="{result.name}">{html.escape(result.name)}: {html.escape(result.question)}</h2>',
             f'<p class="muted">W={settings.nproc} processes, {mode}. <a href="#contents">Contents</a>, '
             '<a href="#glossary">words used</a>.</p>',
             f'<p class="experiment"><b>Experiment.</b> {html.escape(result.experiment)}</p>']
    parts += [_image(demo_dir / name, f"{result.name}: {name}") for name in result.plots]
    parts += [_table(t) for t in result.tables]
    parts.append(f'<div class="verdict {verdict}"><b>{"Conclusion" if result.holds else "Claim not shown"}.</b> '
                 f"{html.escape(result.conclusion)}</div>")
    checks = "".join(f"<li>{'&#10003;' if c.holds else '&#10007;'} {html.escape(c.text)}</li>" for c in result.checks)
    parts.append(f'<p class="muted">The claim: {html.escape(result.claim)}. Checked from the numbers:</p>'
                 f'<ul class="checks">{checks}</ul>')
    return "\n".join(parts)


def write_section(result: Result, settings: Settings) -> Path:
    """The demo's part of the report, into its directory (its plots embedded)."""
    demo_dir = settings.out / result.name
    path = demo_dir / SECTION
    path.write_text(_section(result, demo_dir, settings) + "\n", encoding="utf-8")
    return path


def _contents(summary: dict[str, dict]) -> str:
    """The overview table, each demo's name a link to its section."""
    head = "".join(f"<th>{c}</th>" for c in ("demo", "question", "claim holds"))
    rows = "".join(f'<tr><td><a href="#{html.escape(name)}">{html.escape(name)}</a></td>'
                   f'<td><a href="#{html.escape(name)}">{html.escape(entry["question"])}</a></td>'
                   f'<td>{"yes" if entry["holds"] else "NO"}</td></tr>' for name, entry in summary.items())
    return f'<table id="contents"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _glossary() -> str:
    items = "".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in GLOSSARY.items())
    return f'<h2 id="glossary">Words used on this page</h2>\n<dl class="glossary">{items}</dl>'


def _when(timing: dict | None) -> str:
    """How the last run into OUT went: when, how long, on how busy a machine (timing.json)."""
    if not timing:
        return ""
    load = timing.get("load_average")
    return (f'<p class="muted">Last run: <code>{html.escape(timing.get("command", "disttrain demo"))}</code> on '
            f'{html.escape(str(timing.get("date", "?")))}, {timing.get("seconds", 0):.0f} s on '
            f'{timing.get("cpus", "?")} '
            f'CPUs' + (f" at a load average of {load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else "")
            + " (OUT/timing.json).</p>")


def render(summary: dict[str, dict], sections: dict[str, str], timing: dict | None = None) -> str:
    """The page: the contents (``summary``'s demos, name -> its summary.json entry, each a link), the glossary's
    link, then each demo's section and the glossary. ``timing``: the last run's timing.json, or None."""
    body = "\n".join(sections[name] for name in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>disttrain demonstrations</title>
<style>{STYLE}</style></head>
<body>
<h1>disttrain demonstrations</h1>
<p class="muted">Each question of data-parallel training answered by an experiment: real runs with disttrain's trainer
and gloo process groups, measured and drawn. Every conclusion is computed from the numbers below it. Made by
<code>disttrain demo</code>; each section says how it was run, and running one demo again replaces its section.
The words of disttrain's own (rounding twin, 1+1 collectives, all_gather+Chan, ...) are explained at the end:
<a href="#glossary">words used on this page</a>.</p>
{_when(timing)}
{_contents(summary)}
{body}
{_glossary()}
</body></html>
"""


def write_report(out: Path, summary: dict[str, dict]) -> Path:
    """OUT/report.html from the section of every demo in ``summary`` (in its order) that has one in OUT."""
    sections = {}
    for name in summary:
        with contextlib.suppress(OSError):
            sections[name] = (out / name / SECTION).read_text(encoding="utf-8")
    timing = None
    with contextlib.suppress(OSError, ValueError):
        timing = json.loads((out / TIMING).read_text())
    path = out / "report.html"
    path.write_text(render({n: e for n, e in summary.items() if n in sections}, sections,
                           timing if isinstance(timing, dict) else None), encoding="utf-8")
    return path

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
import re
from collections.abc import Sequence
from pathlib import Path

from .common import Result, Settings

SECTION = "section.html"  # a demo's part of report.html, in its own directory

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
"""


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
             f'<p class="muted">W={settings.nproc} processes, {mode}.</p>',
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


def render(summary: dict[str, dict], sections: dict[str, str]) -> str:
    """The page: an overview of ``summary``'s demos (name -> its summary.json entry), then each one's section."""
    overview = [["demo", "question", "claim holds"]] + [[name, entry["question"], "yes" if entry["holds"] else "NO"]
                                                         for name, entry in summary.items()]
    body = "\n".join(sections[name] for name in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>disttrain demonstrations</title>
<style>{STYLE}</style></head>
<body>
<h1>disttrain demonstrations</h1>
<p class="muted">Each question of data-parallel training answered by an experiment: real runs with disttrain's trainer
and gloo process groups, measured and drawn. Every conclusion is computed from the numbers below it. Made by
<code>disttrain demo</code>; each section says how it was run, and running one demo again replaces its section.</p>
{_table(overview)}
{body}
</body></html>
"""


def write_report(out: Path, summary: dict[str, dict]) -> Path:
    """OUT/report.html from the section of every demo in ``summary`` (in its order) that has one in OUT."""
    sections = {}
    for name in summary:
        with contextlib.suppress(OSError):
            sections[name] = (out / name / SECTION).read_text(encoding="utf-8")
    path = out / "report.html"
    path.write_text(render({n: e for n, e in summary.items() if n in sections}, sections), encoding="utf-8")
    return path

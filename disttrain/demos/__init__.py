"""`disttrain demo NAME|all`: each question of data-parallel training answered by an experiment.

    disttrain demo all [--out runs/demos] [--nproc 4] [--json] [--quick]

Each demo (one module here) trains small runs with the real trainer and real process groups, prints a table
and its conclusion, and writes its plots (PNG) and numbers (result.json) into OUT/NAME/. The conclusion is
computed from the numbers: a claim that does not hold is reported as such, and the exit code is 1. Every run
also updates OUT/summary.json (one entry per demo: claim, holds, conclusion, numbers) and OUT/report.html
(self-contained: the plots are embedded) with the entries and sections of the demos it ran, keeping those of
the demos that an earlier run into OUT left there: `demo precision` after `demo all` replaces only its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError, run_command
from . import check, clip, kmeans, parallelism, precision, reduce, scaling, syncbn, tokens, warmup
from .common import Lab, Result, Settings, save_result

# name -> plan(lab, out_dir) -> finish() -> Result; in the order of the report
DEMOS: dict[str, Callable] = {m.NAME: m.plan for m in (reduce, syncbn, warmup, clip, precision, scaling, kmeans,
                                                        parallelism, tokens, check)}


def run_demos(names: Sequence[str], settings: Settings, log: Callable[[str], None] | None = None) -> list[Result]:
    """Run the named demos (their runs share worker groups); write results, summary.json and report.html."""
    from .report import write_report, write_section

    start, load = time.perf_counter(), _load_average()
    lab = Lab(settings, log)
    finishers = []
    for name in names:
        lab.demo = name
        finishers.append(DEMOS[name](lab, settings.out / name))
    lab.run_all()
    lab.log("  seconds of runs per demo: " + ", ".join(f"{k} {v:.1f}" for k, v in lab.seconds.items()))
    results = [finish() for finish in finishers]
    for result in results:
        save_result(result, settings.out / result.name)
        write_section(result, settings)
    summary = merge_summary(settings.out / "summary.json", {r.name: r.to_dict() for r in results})
    write_timing(settings, names, time.perf_counter() - start, load, lab.seconds)
    write_report(settings.out, summary)
    return results


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not every platform has one
        return None


def write_timing(settings: Settings, names: Sequence[str], seconds: float, load_at_start: float | None,
                 per_demo: dict[str, float]) -> Path:
    """OUT/timing.json: what this run took and on how busy a machine, the numbers to compare with the docs' (which
    name their own date and load): on a shared machine the time follows the load."""
    from .report import TIMING

    which = "all" if list(names) == list(DEMOS) else " ".join(names)
    end = _load_average()
    timing = {"command": f"disttrain demo {which} --nproc {settings.nproc}" + (" --quick" if settings.quick else ""),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(seconds, 1),
              "cpus": os.cpu_count(), "load_average": None if None in (load_at_start, end) else [load_at_start, end],
              "seconds_per_demo": {k: round(v, 1) for k, v in per_demo.items()}}
    path = settings.out / TIMING
    path.write_text(json.dumps(timing, indent=2) + "\n")
    return path


def merge_summary(path: Path, entries: dict[str, dict]) -> dict[str, dict]:
    """Write ``entries`` into summary.json over the entries an earlier run left there (in the order of DEMOS;
    a file that is not a summary is replaced); returns the whole summary."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    merged = {**(earlier if isinstance(earlier, dict) else {}), **entries}
    summary = {name: merged[name] for name in DEMOS if isinstance(merged.get(name), dict)}
    path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return summary


def _require_scikit_learn() -> None:
    try:
        import sklearn  # noqa: F401  (the warmup demo trains on its bundled digits)
    except ImportError:
        raise ConfigError("the demos need scikit-learn, in the demo extra: pip install 'disttrain[demo]'") from None


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("name", metavar="NAME", help=f"one of {', '.join(DEMOS)}, or all")
    parser.add_argument("--out", type=Path, default=Path("runs/demos"), help="output directory (default runs/demos)")
    parser.add_argument("--nproc", type=int, default=4, help="processes of the distributed runs (default 4)")
    parser.add_argument("--json", action="store_true", help="print summary.json instead of the tables")
    parser.add_argument("--quick", action="store_true", help="smaller settings (fewer steps), the same claims")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "disttrain demo") -> int:
    args = _parser(prog).parse_args(argv)
    return run_command(lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    from ..parallel.env import launched_by_torchrun
    from ..observe.plot import require_matplotlib

    if args.name != "all" and args.name not in DEMOS:
        raise ConfigError(f"demo: unknown demo {args.name!r} (choose from {', '.join(DEMOS)}, or all)")
    if launched_by_torchrun():
        raise ConfigError("demo starts its own workers: run it directly, not under torchrun")
    if args.nproc < 2:
        raise ConfigError(f"--nproc: the demos compare W processes with one, so W must be >= 2, got {args.nproc}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot create: {exc.strerror or exc}") from None
    require_matplotlib()  # before any training: a run without its plots would be lost time
    _require_scikit_learn()
    names = list(DEMOS) if args.name == "all" else [args.name]
    start = time.perf_counter()
    print(f"demo: {', '.join(names)} with W={args.nproc} processes{' (quick settings)' if args.quick else ''}, "
          f"into {args.out}", file=sys.stderr, flush=True)
    results = run_demos(names, Settings(out=args.out, nproc=args.nproc, quick=args.quick))
    text = "\n\n".join(r.text() for r in results)
    if args.json:
        print(text, file=sys.stderr)
        print((args.out / "summary.json").read_text(), end="", flush=True)
    else:
        print(text, flush=True)
    failed = [r.name for r in results if not r.holds]
    print(f"demo: {len(results) - len(failed)}/{len(results)} claims hold"
          f"{' (not: ' + ', '.join(failed) + ')' if failed else ''}; {time.perf_counter() - start:.0f} s; "
          f"report: {args.out / 'report.html'}", file=sys.stderr, flush=True)
    return 1 if failed else 0

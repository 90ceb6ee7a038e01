"""One check: launch the script at W ranks and as one process, the rounding twins where the precision needs them,
measure, report.

The W ranks and the reference run at the same time (on 2 cores that is faster than one after the other: each
process spends seconds importing torch; measured in docs/check.md). The twins run afterwards, and only below
float64: they would write wherever the reference writes, and float64 keeps its fixed floor. The second twin runs
only when the first twin's noise leaves the run beyond its bound (verify's rule, verify/twin.py).
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .compare import measure
from .launch import ScriptError, script_command, start, stop, watch
from .records import Records, check_steps
from .report import CheckReport, build_report

TWIN_SEEDS = (1, 2)


def run_check(target: list[str], nproc: int, steps: int = 10, reference_args: str = "", timeout_s: float = 120.0,
              announce: Callable[[str], None] | None = None) -> CheckReport:
    """Check ``target`` (``[SCRIPT.py, ARGS...]`` or ``[-m, MODULE, ARGS...]``) at ``nproc`` ranks against one
    process given ``ARGS + reference_args``, over ``steps`` optimizer steps."""
    if nproc < 2:
        raise ConfigError(f"check: --nproc must be >= 2 (W ranks against one process), got {nproc}")
    if steps < 1:
        raise ConfigError(f"check: --steps must be >= 1, got {steps}")
    if timeout_s <= 0:
        raise ConfigError(f"check: --timeout must be > 0, got {timeout_s:g}")
    try:
        extra = shlex.split(reference_args)
    except ValueError as exc:
        raise ConfigError(f"check: --reference-args: {exc}") from None
    command = script_command(target)
    script = " ".join(target[:2]) if target[0] == "-m" else target[0]
    say = announce or (lambda line: None)
    tmp = Path(tempfile.mkdtemp(prefix="disttrain-check-"))
    start_time = time.perf_counter()
    try:
        say(f"check: {script} at W={nproc} and as one process, {steps} steps")
        runs = [start("run", command, nproc, steps, tmp / "run"),
                start("reference", command + extra, 1, steps, tmp / "reference")]
        _wait(runs, timeout_s, script)
        run, ref = Records(runs[0]), Records(runs[1])
        check_steps(run, ref, steps, script)
        twins: list[Records] = []
        if ref.kind() != "float64":
            twins.append(_twin(command + extra, steps, tmp, TWIN_SEEDS[0], timeout_s, script, say))
        report = build_report(script, run, ref, twins, measure(run, ref, twins, steps), 0.0)
        if twins and report.judgement["distance"] > report.bound:
            # One twin is one sample of the noise: before calling the run anything but EQUIVALENT, the larger of two
            # twins' noises decides (verify's rule, verdict.calibrated_noise; measure() takes the larger per step).
            twins.append(_twin(command + extra, steps, tmp, TWIN_SEEDS[1], timeout_s, script, say))
            report = build_report(script, run, ref, twins, measure(run, ref, twins, steps), 0.0)
        report.seconds = round(time.perf_counter() - start_time, 2)
    except ScriptError:
        for path in tmp.iterdir():  # keep the processes' output the message names, not the records
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return report


def _wait(runs: list, timeout_s: float, script: str) -> None:
    try:
        watch(runs, timeout_s, script)
    finally:
        stop(runs)  # also what the processes started (data loader workers), on every path


def _twin(command: list[str], steps: int, tmp: Path, seed: int, timeout_s: float, script: str,
          say: Callable[[str], None]) -> Records:
    say(f"check: rounding twin {seed} (the reference with each batch's samples in a seeded order)")
    twin = start(f"twin {seed}", command, 1, steps, tmp / f"twin{seed}", permute=seed)
    _wait([twin], timeout_s, script)
    return Records(twin)


__all__ = ["run_check", "TWIN_SEEDS"]

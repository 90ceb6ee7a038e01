"""`disttrain verify`: the W-process run against one process on the same global batches, and a verdict.

The verdict is calibrated (verdict.py, docs/verdicts.md): a third run, the reference's rounding twin (twin.py),
measures how far rounding alone carries this config, and the W-process run is judged against that noise. The fixed
tolerances below decide alone only without a twin (``twin=False``, ``verify --uncalibrated``): what follows is how
they were measured.

The distributed run uses W local workers (parallel/launch.py); the reference is the same config trained in this
process with world size 1, so it sees every global batch whole, read as the W ranks read it (twin.py: their
micro-batches, each Linear/Conv layer on their slices, so it rounds their partial sums alike). Both write final.pt;
the verdict compares the per-step global losses and every floating-point tensor of the final state_dict. The
measurements below were made against a reference running each op on the whole batch, which lands further from a
correct run: the fixed tolerances err wide.

Relative difference of two tensors: max|a - b| / max|b| (infinity norms, so a parameter that is near
zero elementwise does not blow up the ratio); the loss curve is compared the same way, as one vector.

Tolerances. The runs differ only in reduction order (W partial sums vs one), so each step agrees to
~1e-16 in float64 and ~1e-7 in float32; training dynamics then amplify those differences over steps, the
more so near convergence or at the edge of stability. Measured with W=4: the demo (20 steps) 3.7e-15 in
float64 and 8e-7 in float32; an MLP trained to near-zero loss at lr 0.1 reaches 1.1e-5 (float32) after
100 steps, and 3e-9 (float64) / 0.76 (float32) after 300, where rounding differences have grown
~1e7-fold. The verdict allows 1e-10 in float64 and 1e-4 in float32: verify is a check for runs of tens
to about a hundred steps (longer runs: stepwise.py, segment by segment between checkpoints). Every real mistake measured is orders of magnitude above (clipping before
averaging 5e-2, per-rank BatchNorm 0.16, reduce=sum 1.3).

Under autocast (train.precision bf16 / fp16) the tolerances are keyed by the precision: each step rounds the
gradients' partial sums to half precision before the float32 reduction (precision.py), so W processes and one
process differ by ~1e-4 (bf16) and ~3e-5 (fp16) per step; measured with tests/measure_precision.py (README "Mixed
precision").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.format import CheckpointError, load_final
from ..config.schema import Config
from ..parallel.env import choose_device, distributed
from ..errors import ConfigError
from ..config.identity import trajectory_differences
from ..run.tasks import launch_local
from ..observe.runlog import read_metrics
from .drawhook import RecordDraws
from .draws import describe
from .mistakes import mistake_twins
from .twin import RANK_ORDER, SAMPLE_ORDER, train_reference
from .rows import shown_rows, with_gaps
from .verdict import (C, CEILING, EQUIVALENT, FLOOR, INCONCLUSIVE, NOT_EQUIVALENT, Mistake, compare, decided_line,
                      inconclusive_line)
# Where they were defined before verdicts were calibrated; stepwise.py and users' scripts import them from here.
from .verdict import relative_difference, state_difference  # noqa: F401

# The largest relative difference accepted per step of training (whole-run verify: a run of tens of steps;
# step-wise verify: BASE * k for a segment of k steps, stepwise.py). Measurements: the module docstrings.
# Mixed precision (train.precision bf16 / fp16, float32 weights): keyed by the precision; measured the same way
# (tests/measure_precision.py, README "Mixed precision").
# float32 with train.tf32 on a CUDA device (matmuls and convolutions with 10 mantissa bits, as fp16's): fp16's rows,
# not measured (no GPU has run them; on the CPU train.tf32 changes nothing but the tolerance).
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bf16": 3e-3, "fp16": 1e-3, "tf32": 1e-3}
# Whole-run verify (a run of tens of steps): the per-step tolerance for float32/float64, as measured above; bf16 and
# fp16 runs carry their rounding of every step's gradient (~2^-9, ~2^-12) through the run, so their whole-run
# tolerances are wider (measured: README "Mixed precision"; a bf16 W=3 run of 12 steps: 2.4e-3, clipping before
# averaging 0.15, reduce=sum 1.2).
RUN_TOLERANCE = {**TOLERANCE, "bf16": 1e-2, "fp16": 3e-3, "tf32": 3e-3}


def tolerance_key(dtype: str, precision: str = "fp32", tf32: bool = False) -> str:
    """The row of TOLERANCE for a run: its dtype, its autocast precision, or tf32 (float32 with train.tf32)."""
    if precision != "fp32":
        return precision
    return "tf32" if tf32 and dtype == "float32" else dtype


def tolerance(dtype: str, steps: int = 1, precision: str = "fp32", tf32: bool = False) -> float:
    """The tolerance of ``steps`` steps in ``dtype`` (under autocast to ``precision``): TOLERANCE[key] * steps."""
    return TOLERANCE[tolerance_key(dtype, precision, tf32)] * steps


def run_tolerance(dtype: str, precision: str = "fp32", tf32: bool = False) -> float:
    """Whole-run verify's tolerance (RUN_TOLERANCE)."""
    return RUN_TOLERANCE[tolerance_key(dtype, precision, tf32)]


def precision_name(dtype: str, precision: str) -> str:
    """How reports name the arithmetic of a run: "float32", or "bf16, float32 weights"."""
    return dtype if precision == "fp32" else f"{precision}, {dtype} weights"


@dataclass
class VerifyReport:
    world_size: int
    dtype: str
    tolerance: float  # the floor (kept under its old name for scripts reading --json)
    steps: list[dict[str, float]]  # step, loss_distributed, loss_reference, rel_diff
    max_loss_rel_diff: float
    max_param_rel_diff: float
    worst_param: str
    equivalent: bool  # verdict == EQUIVALENT
    claimed: bool = True  # False: equivalence is not expected for this config (see `reason`)
    reason: str = ""
    verdict: str = EQUIVALENT  # EQUIVALENT, NOT EQUIVALENT or INCONCLUSIVE (verdict.py)
    calibrated: bool = True  # False: no rounding twin ran (--uncalibrated); the floor alone decided
    loss_noise: float | None = None  # the twin's distance from the reference: loss curve
    param_noise: float | None = None  # and parameters (the worst tensor)
    floor: float = 0.0
    loss_bound: float = 0.0  # max(C x noise, floor)
    param_bound: float = 0.0
    c: float = C
    second_twin: bool = False  # the noise is the larger of two twins' (the run was beyond the first twin's bound)
    wants_second_twin: bool = False  # beyond the first twin's bound, and the second twin has not run yet
    randomness: str = ""  # draws from a process generator in the reference (draws.describe): no verdict on them
    ceiling: float | None = None  # the most rounding reaches in this dtype (verdict.CEILING)
    mistakes: list[dict] | None = None  # the mistake twins measured: name, loss, parameters, acted (None: not run)
    wants_mistakes: bool = False  # within the bounds, and the mistake twins have not run yet
    why: str = ""  # the verdict line's reason (INCONCLUSIVE), or which quantity decided (EQUIVALENT)
    reference_world_size: int = 1  # the run compared against (disttrain.testing may compare W=3 with W=2)
    no_twin: str = "--uncalibrated: no rounding twin ran"  # why the noise is not measured, in the caller's terms

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def table(self) -> str:
        w, r = self.world_size, self.reference_world_size
        shown = shown_rows([s["rel_diff"] for s in self.steps])  # a long run: the ends and the worst steps
        rows = [f"{s['step']:>5}  {s['loss_distributed']:>20.15f}  {s['loss_reference']:>20.15f}  {s['rel_diff']:>9.2e}"
                for s in (self.steps[i] for i in shown)]
        lines = [f"{'step':>5}  {f'loss (W={w})':>20}  {f'loss (W={r})':>20}  {'rel diff':>9}",
                 *with_gaps(shown, len(self.steps), rows, "step")]
        if not self.claimed:
            lines.append(f"note: {self.reason}")
        if self.randomness:
            return "\n".join(lines + [
                f"max relative loss difference:      {self.max_loss_rel_diff:.3e}",
                f"max relative parameter difference: {self.max_param_rel_diff:.3e} ({self.worst_param})",
                f"verdict: INCONCLUSIVE: {self.randomness}"])
        lines += [
            f"max relative loss difference:      {self.max_loss_rel_diff:.3e}",
            f"max relative parameter difference: {self.max_param_rel_diff:.3e} ({self.worst_param})",
            ("rounding noise (reference vs twin): " + (f"loss {self.loss_noise:.3e}, parameters {self.param_noise:.3e}"
             if self.calibrated else f"not measured ({self.no_twin})")
             + (" (the larger of two twins': the run was beyond the first one's bound)" if self.second_twin else "")),
            f"floor ({self.dtype}): {self.floor:.0e}" + ("" if self.calibrated else " (the fixed tolerance)"),
            (f"bound, max({self.c:g} x noise, floor): " if self.calibrated else "bound, the fixed tolerance: ")
            + f"loss {self.loss_bound:.3e}, parameters {self.param_bound:.3e}",
        ]
        for m in self.mistakes or ():
            lines.append(f"mistake twin, {m['name']}: loss {m['loss']:.3e}, parameters {m['parameters']:.3e}"
                         + ("" if m["acted"] else " (it leaves this run's numbers unchanged)"))
        if self.verdict == INCONCLUSIVE and self.claimed:
            lines.append(f"verdict: {self.why}")
        else:
            if self.why:
                lines.append(self.why)
            match = self.verdict == EQUIVALENT
            against = "one process" if r == 1 else f"{r} processes"
            lines.append(f"verdict: {self.verdict}: {w} processes {'match' if match else 'do not match'} {against} "
                         "on the global batch" + ("" if self.calibrated else
                                                  " (uncalibrated: the fixed floor only, no rounding twin)"))
        return "\n".join(lines)


def compare_runs(cfg: Config, dist_dir: Path, ref_dir: Path, twin_dir: Path | None = None,
                 second_twin_dir: Path | None = None, mistakes: list[Mistake] | None = None,
                 randomness: str = "") -> VerifyReport:
    """Compare the runs in ``dist_dir`` and ``ref_dir`` (each: final.pt, metrics.jsonl), calibrated by the twin
    in ``twin_dir`` (None: the fixed tolerance alone, uncalibrated), or by the larger of its noise and the second
    twin's in ``second_twin_dir`` (twin.py); ``mistakes``: the mistake twins measured (mistakes.py);
    ``randomness``: the reference drew from a process generator (draws.describe's line): INCONCLUSIVE."""
    dist_ckpt, ref_ckpt = load_final(dist_dir / "final.pt"), load_final(ref_dir / "final.pt")
    twins = [_final_run(d) for d in (twin_dir, second_twin_dir)]
    return compare_states(dist_ckpt["world_size"], dist_ckpt["model"], ref_ckpt["model"],
                          [m["loss"] for m in read_metrics(dist_dir)], [m["loss"] for m in read_metrics(ref_dir)],
                          dtype=cfg.train.dtype, precision=cfg.train.precision, tf32=cfg.train.tf32,
                          reason=unclaimed_reason(cfg), twin=twins[0], second_twin=twins[1], mistakes=mistakes,
                          randomness=randomness)


Run = tuple[dict[str, torch.Tensor], list[float]]  # a final state and its loss curve


def _final_run(run_dir: Path | None) -> Run | None:
    """A run's final model state and loss curve (None: no run)."""
    if run_dir is None:
        return None
    return load_final(run_dir / "final.pt")["model"], [m["loss"] for m in read_metrics(run_dir)]


_DTYPE_KEYS = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compare_states(world_size: int, dist_state: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor],
                   dist_losses: list[float], ref_losses: list[float], *, dtype: str | None = None,
                   precision: str = "fp32", tf32: bool = False, rtol: float | None = None, reason: str = "",
                   twin: Run | None = None, second_twin: Run | None = None, mistakes: list[Mistake] | None = None,
                   randomness: str = "", reference_world_size: int = 1) -> VerifyReport:
    """The verdict on two final states and their loss curves (``disttrain verify``, and disttrain.testing's
    assert_equivalent). ``dtype``: the row of the tolerance tables (default: the dtype of the state's first floating
    tensor). With a rounding twin (``twin``: its final state and loss curve, the reference in another summation
    order, twin.py) the verdict is calibrated by its distance, the run's own rounding noise, over the dtype's floor
    (verdict.py), or by the larger of its and the ``second_twin``'s, when given; without one the fixed
    whole-run tolerance decides alone (uncalibrated). ``rtol`` replaces the floor or tolerance; ``reason``: why
    equivalence is not claimed at all; ``mistakes``: the mistake twins measured on this run (verdict.Mistake; None:
    the sensitivity is not required); ``randomness``: why the runs draw differently (INCONCLUSIVE whatever else)."""
    if len(dist_losses) != len(ref_losses):
        raise ValueError(f"the runs logged {len(dist_losses)} and {len(ref_losses)} losses: not the same steps")
    if dtype is None:
        dtype = _DTYPE_KEYS.get(next(v.dtype for v in ref_state.values() if v.is_floating_point()), "float32")
    calibrated = twin is not None
    if rtol is not None:
        floor = rtol
    elif calibrated:
        floor = FLOOR[tolerance_key(dtype, precision, tf32)]
    else:
        floor = run_tolerance(dtype, precision, tf32)
    key = tolerance_key(dtype, precision, tf32)
    ceiling = CEILING.get(key) if calibrated and rtol is None else None
    result = compare(dist_state, dist_losses, ref_state, ref_losses, floor, *(twin or (None, None)),
                     *(second_twin or (None, None)), ceiling=ceiling, mistakes=mistakes)
    # Like tensors, the loss curve is compared relative to its largest value: a per-step relative difference
    # is ill-conditioned where a converging loss approaches zero.
    scale = max(max((abs(r) for r in ref_losses), default=0.0), 1e-300)
    steps = [{"step": i, "loss_distributed": d, "loss_reference": r, "rel_diff": abs(d - r) / scale}
             for i, (d, r) in enumerate(zip(dist_losses, ref_losses, strict=True))]
    verdict = INCONCLUSIVE if randomness else NOT_EQUIVALENT if reason else result.verdict
    judged = [result.loss, result.params]
    why = (inconclusive_line(judged, mistakes) if verdict == INCONCLUSIVE and not randomness else
           decided_line(judged, mistakes) if verdict == EQUIVALENT and mistakes is not None else "")
    return VerifyReport(world_size=world_size, dtype=precision_name(dtype, precision),
                        tolerance=floor, steps=steps, max_loss_rel_diff=result.loss.distance,
                        max_param_rel_diff=result.params.distance, worst_param=result.worst_param,
                        equivalent=verdict == EQUIVALENT, claimed=not reason, reason=reason, verdict=verdict,
                        calibrated=calibrated, loss_noise=result.loss.noise,
                        param_noise=result.params.noise, floor=floor, loss_bound=result.loss.bound,
                        param_bound=result.params.bound, second_twin=result.second_twin,
                        wants_second_twin=calibrated and second_twin is None and result.wants_second_twin,
                        randomness=randomness, ceiling=ceiling, why=why,
                        mistakes=None if mistakes is None else [dataclasses.asdict(m) for m in mistakes],
                        wants_mistakes=not randomness and not reason and result.wants_mistakes,
                        reference_world_size=reference_world_size)


def unclaimed_reason(cfg: Config) -> str:
    """Why equivalence is not even claimed for ``cfg`` ("" when it is)."""
    k = cfg.train.accumulation_steps
    if cfg.model.norm != "none" and k > 1:
        return (f"model.norm={cfg.model.norm} with train.accumulation_steps={k}: batch-norm statistics are "
                "computed per micro-batch, so a run with accumulation does not equal one device on the "
                "global batch; equivalence is not claimed")
    return ""


def _with_out_dir(cfg: Config, out_dir: Path) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out_dir)))


def verify(cfg: Config, nproc: int | None, against: Path | None = None, twin: bool = True) -> VerifyReport:
    """Train with ``nproc`` workers and with one process, and the reference's rounding twin; compare. Runs go to
    {out_dir}/distributed, /reference, /twin, and /twin2 when the run is beyond the first twin's bound (the second
    twin, twin.py). ``twin`` False: no twin, the fixed floor alone (uncalibrated).

    ``against``: compare an existing run directory (e.g. written by torchrun on several nodes) instead of
    launching local workers; it must have been trained with the same config.
    """
    root = Path(cfg.train.out_dir)
    ref_dir = root / "reference"
    if against is None:
        assert nproc is not None, "verify needs nproc or against"
        dist_dir = root / "distributed"
        launch_local(_with_out_dir(cfg, dist_dir), nproc, console=False)
    else:
        dist_dir = Path(against)
        _check_comparable(cfg, dist_dir)
    ref_cfg = _with_out_dir(cfg, ref_dir)
    # The reference runs where the ranks did: device auto with more local ranks than GPUs put them on the CPU.
    device = ref_cfg.train.device
    if against is None and choose_device(device, 0, nproc)[0].type == "cpu":
        device = "cpu"
    # The one-process runs read each batch as the run's ranks did and run each layer on their slices (twin.py): a
    # run resized on the way is read as its final world size read it.
    ranks = nproc if against is None else int(load_final(dist_dir / "final.pt")["world_size"])
    with distributed(device, ref_cfg.comm.timeout_s) as env:
        if env.world_size != 1:
            raise RuntimeError("the reference run must be a single process")
        draws = RecordDraws(steps=1)  # the reference's first step (recording slows a step 2-3x: drawhook.py)
        train_reference(ref_cfg, env, ranks, hooks=(draws,))
        for name in ("twin", "twin2", *(f"mistake{i}" for i in range(3))):  # an earlier verify's, not this verdict's
            shutil.rmtree(root / name, ignore_errors=True)
        if draws.draws:  # the twins would measure the draws, not rounding: no verdict, whatever the distance
            return compare_runs(cfg, dist_dir, ref_dir, randomness=describe(draws.draws))
        if not twin:
            return compare_runs(cfg, dist_dir, ref_dir)
        train_reference(_with_out_dir(cfg, root / "twin"), env, ranks, RANK_ORDER)
        twins = [root / "twin"]
        report = compare_runs(cfg, dist_dir, ref_dir, *twins)
        if report.wants_second_twin:
            train_reference(_with_out_dir(cfg, root / "twin2"), env, ranks, SAMPLE_ORDER)
            twins.append(root / "twin2")
            report = compare_runs(cfg, dist_dir, ref_dir, *twins)
        if not report.wants_mistakes:
            return report
        mistakes = mistake_twins(cfg, root, env, ranks, (report.loss_bound, report.param_bound))
    return compare_runs(cfg, dist_dir, ref_dir, *twins, mistakes=mistakes)


def _check_comparable(cfg: Config, run_dir: Path) -> None:
    """The run at ``run_dir`` must exist, be readable and have been trained with ``cfg`` (execution keys aside)."""
    for name in ("final.pt", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"--against {run_dir}: no {name} there (train into it first)")
    try:
        theirs = load_final(run_dir / "final.pt")["config"]
    except CheckpointError as exc:
        raise ConfigError(f"--against: {exc}") from None
    differ = trajectory_differences(cfg.to_dict(), theirs)
    if differ:
        raise ConfigError(f"--against {run_dir}: trained with a different config ({', '.join(differ)} differ)")

"""Command line: parse argv once, call into the library. No training logic here.

    disttrain train  CONFIG [--nproc N] [--resume] [--max-restarts R] [--stop-at S] [--set section.key=value ...]
    disttrain verify CONFIG [--nproc N | --against RUN_DIR] [--uncalibrated] [--set ...] [--json]
    disttrain verify CONFIG --against RUN_DIR --stepwise [--reference-dtype float32|float64] [--jobs N]
                            [--uncalibrated] [--json]
    disttrain config CONFIG [--set ...]            print the resolved config
    disttrain bench [NAME [options] [--json]]      benchmarks: step, scaling, allreduce, syncbn
    disttrain demo NAME|all [--out DIR] [--nproc N] [--json] [--quick]
    disttrain plot RUN_DIR [RUN_DIR ...] [--out FILE.png]
    disttrain data export digits DIR               scikit-learn's digits as an image folder (DIR/CLASS/*.png)
    disttrain data export text DIR SOURCE...       text files as byte-level tokens (data.name: tokens)
    disttrain check --nproc W [--steps N] [--reference-args "ARGS"] [--json] -- SCRIPT.py [ARGS...]
                                                   any training script at W ranks against one process
    disttrain checkpoint export RUN_DIR [--step S] OUT   a checkpoint's model as one file (final.pt layout)
    disttrain checkpoint info RUN_DIR              a run's checkpoints: step, format, world size, bytes per rank

Exit codes: 0 success; 1 verify or check found no equivalence (NOT EQUIVALENT), or a worker failed; 2 a user error (bad
config, impossible batch split, missing file, wrong usage), reported in one line without a traceback; 3 verify is
INCONCLUSIVE (the run's own rounding noise is as large as a known mistake: docs/verdicts.md).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..config.schema import Config
from ..config.validate import check_world_size
from ..config.parse import load_config
from ..errors import EXIT_OK, ConfigError, StartupSignals, run_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disttrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,verify,config,bench,demo,plot,data,check,checkpoint}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable); the value is parsed as YAML")

    p = sub.add_parser("train", help="train; under torchrun, or with --nproc N local workers")
    common(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="start N local worker processes with torch's elastic launcher (not under torchrun)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest readable checkpoint in train.out_dir (any world size)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="R",
                   help="with --nproc: restart the worker group up to R times after a worker dies; it continues "
                        "from the newest checkpoint (under torchrun: torchrun's --max-restarts)")
    p.add_argument("--stop-at", type=int, default=None, metavar="S",
                   help="stop after S completed steps with a checkpoint there (resume later with --resume)")
    p = sub.add_parser("verify", help="N workers vs one process on the same global batches: the verdict")
    common(p)
    p.add_argument("--nproc", type=int, default=None, help="worker processes of the distributed run (default 2)")
    p.add_argument("--against", type=Path, default=None, metavar="RUN_DIR",
                   help="compare an existing run (final.pt + metrics.jsonl, e.g. from torchrun) instead of "
                        "launching workers")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the table")
    p.add_argument("--uncalibrated", action="store_true",
                   help="skip the rounding twins (one or two one-process runs fewer) and judge by the fixed floor "
                        "only: NOT the full check (a chaotic run can fail it although correct)")
    p.add_argument("--stepwise", action="store_true",
                   help="with --against: retrain each segment between consecutive checkpoints of the run in one "
                        "process and compare it (long float32, GPU and multi-node runs; needs every checkpoint)")
    p.add_argument("--reference-dtype", choices=["float32", "float64"], default=None,
                   help="--stepwise: the reference's dtype (default: the run's)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="--stepwise: check segments in N local processes")
    p = sub.add_parser("config", help="print the resolved config (defaults < YAML < --set)")
    common(p)
    p = sub.add_parser("bench", help="benchmarks that print numbers: `disttrain bench` lists them", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    for name, text in (("demo", "the demonstrations: `disttrain demo all`, `disttrain demo --help`"),
                       ("plot", "loss, lr and gradient norm of runs: `disttrain plot --help`")):
        sub.add_parser(name, help=text, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("data", help="data tools: `disttrain data export digits DIR`")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{export}")
    p = data_sub.add_parser("export", help="write a dataset: digits as an image folder (DIR/CLASS_NAME/*.png), or "
                                           "text files as byte-level tokens")
    p.add_argument("dataset", help="digits (scikit-learn's 1,797 8x8 handwritten digits) or text (SOURCE files, "
                                   "one document each)")
    p.add_argument("out_dir", type=Path, metavar="DIR", help="the folder to write (created if missing)")
    p.add_argument("sources", type=Path, nargs="*", metavar="SOURCE", help="text: text files or folders of them")
    p.add_argument("--eos", action="store_true", help="text: end every document with token 256 (vocabulary 257)")
    p.add_argument("--pattern", default="*", metavar="GLOB", help="text: the files taken from a folder (default *)")
    p = sub.add_parser("check", help="run a training script of one's own at W ranks and as one process, compare "
                                     "every optimizer step: the verdict (docs/check.md)")
    p.add_argument("--nproc", type=int, required=True, metavar="W", help="ranks of the distributed run (>= 2)")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="optimizer steps to record and compare")
    p.add_argument("--reference-args", default="", metavar="ARGS",
                   help="appended to the script's arguments for the one process (the last value wins in argparse: "
                        "e.g. the one-device batch size)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="end the check when no process records an optimizer step for S seconds")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the report")
    p.add_argument("target", nargs=argparse.REMAINDER, metavar="-- SCRIPT.py|-m MODULE [ARGS...]",
                   help="the script (or module) and its arguments, after --")
    p = sub.add_parser("checkpoint", help="a run's checkpoints, read in one process: export, info")
    checkpoint_sub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="{export,info}")
    p = checkpoint_sub.add_parser("export", help="write a checkpoint's model as one file with no process group: "
                                                 "final.pt's layout, or .safetensors when OUT ends so")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (train.out_dir)")
    p.add_argument("out", type=Path, metavar="OUT", help="the file to write (.pt, or .safetensors)")
    p.add_argument("--step", type=int, default=None, metavar="S", help="the checkpoint of step S (default: newest)")
    p = checkpoint_sub.add_parser("info", help="list a run's checkpoints: step, format, world size, bytes per rank")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (train.out_dir)")
    return parser


def _preflight(nproc: int | None, cfg: Config, workers_check: bool = False) -> None:
    """User errors that would otherwise surface inside workers: worker count, device, output directory, import
    paths and what the factories return. ``workers_check``: the workers about to start check the import paths and
    the factories themselves (a user error there is still one line, exit 2: parallel/launch.py), so the model's
    check forward does not delay their start."""
    from ..parallel.env import choose_device, launched_by_torchrun, local_world_size

    if nproc is not None:
        if launched_by_torchrun():
            raise ConfigError("--nproc cannot be used under torchrun: torchrun's --nproc_per_node sets the workers")
        if nproc < 1:
            raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
        check_world_size(cfg, nproc)
    if cfg.train.device == "cuda":  # one GPU per local rank, or a one-line error before any worker starts
        choose_device("cuda", 0, nproc if nproc is not None else local_world_size(1))
    out_dir = Path(cfg.train.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"train.out_dir: cannot create {out_dir}: {exc.strerror or exc}") from None
    # Users' code (model.name / data.name import paths): imported here; built here too when workers will be
    # started, since an error inside a worker is a failed worker (exit 1), not a user error (exit 2).
    if workers_check and nproc is not None and nproc > 1:
        return
    from ..run.build import preflight

    preflight(cfg, build_parts=nproc is not None)


def _preflight_train(cfg: Config, args: argparse.Namespace) -> bool:
    """Resume and restart options that would otherwise fail inside every worker. True: ``--resume`` of a run
    that is already complete (its newest checkpoint is at train.steps), so there is nothing to train."""
    from ..checkpoint.format import checkpoint_at, checkpoint_dir, newest_readable
    from ..parallel.env import launched_by_torchrun
    from ..checkpoint.resume import check_resumable

    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be >= 0, got {args.max_restarts}")
    if args.max_restarts and (args.nproc is None or args.nproc < 2):
        raise ConfigError("--max-restarts needs --nproc N with N >= 2 (under torchrun, use torchrun's --max-restarts)")
    if args.max_restarts and not cfg.train.checkpoint_every:
        raise ConfigError("--max-restarts with train.checkpoint_every=0: a restarted group would start over")
    if args.stop_at is not None and not 1 <= args.stop_at <= cfg.train.steps:
        raise ConfigError(f"--stop-at: must be in [1, train.steps={cfg.train.steps}], got {args.stop_at}")
    if args.stop_at is not None and not cfg.train.checkpoint_every:
        raise ConfigError("--stop-at with train.checkpoint_every=0: the run could not be resumed")
    if args.resume and not launched_by_torchrun():  # under torchrun, rank 0 checks and tells the others
        state = newest_readable(cfg.train.out_dir, warn=lambda line: None)  # rank 0 reports skipped files
        if state is None:
            raise ConfigError(f"--resume: no readable checkpoint in {checkpoint_dir(cfg.train.out_dir)}")
        check_resumable(cfg, state)
        if state["step"] == cfg.train.steps:
            print(f"run already complete: {checkpoint_at(cfg.train.out_dir, state['step'])} is step "
                  f"{state['step']} of train.steps={cfg.train.steps}; nothing to train (raise train.steps to "
                  "continue it)", flush=True)
            return True
    return False


def _train(cfg: Config, args: argparse.Namespace) -> int:
    """Train; a run stopped by a signal (stop.py) exits with 128 + the signal number, as the signal would."""
    if args.nproc is not None and args.nproc > 1:
        from ..run.nproc import launch_training  # the launcher imports no training code: its workers do

        signum = launch_training(cfg, args.nproc, resume=args.resume, stop_at=args.stop_at,
                                 max_restarts=args.max_restarts)
        if signum is None:
            _report_stop(cfg, args.stop_at)
    else:
        from ..parallel.env import distributed
        from ..run.tasks import train_or_stop

        with distributed(cfg.train.device, cfg.comm.timeout_s) as env:
            signum = train_or_stop(cfg, env, resume=args.resume, stop_at=args.stop_at)
            if signum is None and env.is_main:  # under torchrun every rank runs this; rank 0 wrote the checkpoint
                _report_stop(cfg, args.stop_at)
    return EXIT_OK if signum is None else 128 + signum


def _report_stop(cfg: Config, stop_at: int | None) -> None:
    """After ``--stop-at S`` (S < train.steps): one line with the step and the checkpoint it left to resume."""
    from ..checkpoint.format import list_checkpoints

    if stop_at is None or stop_at >= cfg.train.steps:
        return  # the run went to the end: final.pt is the result
    # The newest checkpoint is the one the run stopped at (train.Trainer writes it at the stop step).
    step, path = list_checkpoints(cfg.train.out_dir)[-1]
    print(f"stopped at step {step} of {cfg.train.steps}: checkpoint {path}; continue with --resume", flush=True)


def _verify(cfg: Config, nproc: int | None, against: Path | None, as_json: bool, uncalibrated: bool) -> int:
    from ..verify.verdict import EXIT_CODES
    from ..verify.whole import _check_comparable, verify

    if against is not None:
        _check_comparable(cfg, against)  # a run that is not there is one line, before any header
    what = f"the run in {against}" if against else f"training with {nproc} processes"
    print(f"verify: {what} against 1 process ({cfg.train.steps} steps, global batch "
          f"{cfg.train.global_batch_size}, {cfg.train.dtype})", file=sys.stderr, flush=True)
    report = verify(cfg, nproc, against, twin=not uncalibrated)
    print(report.to_json() if as_json else report.table(), flush=True)
    return EXIT_CODES[report.verdict]


def _verify_stepwise(cfg: Config, args: argparse.Namespace) -> int:
    from ..verify.stepwise import verify_stepwise
    from ..verify.verdict import EXIT_CODES

    report = verify_stepwise(cfg, args.against, args.reference_dtype, jobs=args.jobs,
                             announce=lambda line: print(line, file=sys.stderr, flush=True), twin=not args.uncalibrated)
    print(report.to_json() if args.json else report.table(), flush=True)
    return EXIT_CODES[report.verdict]


def _check(args: argparse.Namespace) -> int:
    from ..check import run_check
    from ..parallel.env import launched_by_torchrun

    if launched_by_torchrun():
        raise ConfigError("check starts the script's processes itself: run it directly, not under torchrun")
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    report = run_check(target, args.nproc, args.steps, args.reference_args, args.timeout,
                       announce=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.to_json() if args.json else report.table(), flush=True)
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from ..bench import main as bench_main

        return bench_main(argv[1:], prog="disttrain bench")
    if argv[:1] == ["demo"]:  # so do the demonstrations and the plots
        from ..demos import main as demo_main

        return demo_main(argv[1:], prog="disttrain demo")
    if argv[:1] == ["plot"]:
        from ..observe.plot import main as plot_main

        return plot_main(argv[1:], prog="disttrain plot")
    args = _parser().parse_args(argv)
    if args.command == "train":  # a stop signal before the run can stop at a step: one line, 128 + its number
        with StartupSignals():
            return run_command(lambda: _command(args))
    return run_command(lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    from ..parallel.env import launched_by_torchrun

    if args.command == "check":
        return _check(args)
    if args.command == "data":
        from ..data.export import export

        print(export(args.dataset, args.out_dir, args.sources, args.eos, args.pattern))
        return EXIT_OK
    if args.command == "checkpoint":
        from ..checkpoint import tools

        print(tools.info(args.run_dir) if args.checkpoint_command == "info" else
              tools.export(args.run_dir, args.step, args.out))
        return EXIT_OK
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return EXIT_OK
    if args.command == "verify":
        if launched_by_torchrun():
            raise ConfigError("verify starts its own workers: run it directly, not under torchrun "
                              "(to check a torchrun run, use verify --against RUN_DIR)")
        if args.against is not None and args.nproc is not None:
            raise ConfigError("verify: give --nproc or --against, not both")
        if args.stepwise and args.against is None:
            raise ConfigError("verify --stepwise needs --against RUN_DIR (a run trained with checkpoints)")
        if not args.stepwise and (args.reference_dtype or args.jobs != 1):
            raise ConfigError("verify: --reference-dtype and --jobs need --stepwise")
        if args.stepwise:
            return _verify_stepwise(cfg, args)
        if args.against is None and args.nproc is None:
            args.nproc = 2
    with _no_trace_on_refusal(Path(cfg.train.out_dir)):
        _preflight(args.nproc, cfg, workers_check=args.command == "train")
        complete = args.command == "train" and _preflight_train(cfg, args)
    if args.command == "train":
        if complete:
            return EXIT_OK  # --resume of a complete run: said so, nothing to train
        return _train(cfg, args)
    return _verify(cfg, args.nproc, args.against, args.json, args.uncalibrated)


@contextlib.contextmanager
def _no_trace_on_refusal(out_dir: Path) -> Iterator[None]:
    """A run that refuses to start (a user error in the checks inside) leaves no directory behind: the
    directories the checks created for ``out_dir`` are removed again, if still empty."""
    missing = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty directory: nothing a check wrote is lost
        raise

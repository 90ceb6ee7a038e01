"""`disttrain bench`: benchmarks that print a table (or ``--json``), every ratio measured side by side in one run.

    disttrain bench                    list the benchmarks
    disttrain bench NAME [options]     run one; ``disttrain bench NAME --help`` for its options

One module per benchmark (step, scaling, allreduce, syncbn, randomness, data, memory, launch, checkpoint, syncs), each with ``add_arguments(parser)``,
``run(args, run_world) -> dict`` and ``format_table(result) -> str``; common.py holds what they share.
A benchmark prints numbers; nothing here is a test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from ..errors import EXIT_OK, run_command

BENCHMARKS = {
    "step": "the trainer's step vs a hand-written DDP loop, same model, data and batch (W=1,2)",
    "scaling": "strong scaling of the trainer: fixed global batch, W=1..N, efficiency T1/(W TW)",
    "allreduce": "all_reduce algbw/busbw over 1 KiB..64 MiB against the machine's memcpy bandwidth",
    "syncbn": "SyncBatchNorm forward+backward: disttrain vs two-pass and all_gather baselines",
    "randomness": "step time with per-sample dropout and augmentation against none and torch's dropout",
    "data": "data from disk: loader samples/s per worker count, step time disk vs memory, start-up vs dataset size",
    "memory": "bytes per rank (parameters, gradients, optimizer, activations), ddp vs fsdp, with/without recompute",
    "launch": "`disttrain train --nproc W` vs torchrun on one config, separate processes, alternating (paired ratio)",
    "checkpoint": "a save's peak RSS, bytes per rank and time the loop waits: full vs sharded (DCP) vs async; resume W=2->4",
    "syncs": "host syncs per training step (tensor reads; on CUDA also torch's sync reports), per strategy and setting",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every user error of disttrain
        print(f"disttrain: error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def listing(prog: str) -> str:
    width = max(map(len, BENCHMARKS))
    lines = [f"usage: {prog} NAME [options] [--json]", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in BENCHMARKS.items()]
    lines += ["", f"`{prog} NAME --help` shows a benchmark's options."]
    return "\n".join(lines)


def parser(name: str, prog: str = "disttrain bench") -> argparse.ArgumentParser:
    """The command-line parser of benchmark ``name`` (one of BENCHMARKS)."""
    module = importlib.import_module(f"{__name__}.{name}")
    result = _Parser(prog=f"{prog} {name}", description=module.__doc__.split("\n")[0])
    module.add_arguments(result)
    result.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    return result


def main(argv: Sequence[str] | None = None, prog: str = "disttrain bench", run_world=None) -> int:
    """Run one benchmark from the command line. ``run_world``: how to run on W ranks (default: spawn them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(listing(prog))
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"disttrain: error: unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{name}")
    args = parser(name, prog).parse_args(argv[1:])

    from .common import spawn_world

    def command() -> int:
        result = module.run(args, run_world or spawn_world)
        print(json.dumps(result, indent=2) if args.json else module.format_table(result), flush=True)
        return EXIT_OK

    return run_command(command)

"""docs/reference.md, generated from the argument parsers and the config schema, so it cannot drift from them.

    python -m disttrain.cli.reference > docs/reference.md

tests/test_docs.py fails when the file differs from what this prints.
"""

from __future__ import annotations

import argparse

from ..config import reference_table

_HEADER = """\
# Reference: commands and configuration

Generated from the argument parsers and the config schema by `python -m disttrain.cli.reference >
docs/reference.md`; `tests/test_docs.py` fails when this page is stale. Every command runs from the
repository root in the project's environment (`source .venv/bin/activate`).
"""

_EXIT_CODES = """\
## Exit codes

- 0: success (`verify`: the runs are equivalent).
- 1: `verify` found no equivalence, a worker failed, or a peer died or timed out.
- 2: a user error (bad YAML, unknown key, wrong type or range, impossible batch split, missing file, wrong
  usage), always one line on stderr naming what is wrong.
- 128 + the signal number: a run stopped by SIGTERM, SIGINT or SIGUSR1 at a step every rank agreed on, with a
  checkpoint there ([Fault tolerance](fault-tolerance.md#signals-stop-at-a-step-lose-nothing)).
"""

_RUN_DIR = """\
## What a run writes

`disttrain train` writes into `train.out_dir`:

- `config.yaml`: the resolved config.
- `metrics.jsonl`: every step's global mean loss, samples, lr and time. The global loss needs a
  collective, so the ranks reduce it for many steps at once, about once a second
  ([Performance](performance.md#the-logged-loss)), and before every checkpoint: console lines and records appear
  in bursts, at most about a second late, and all of them are there when the run ends.
- `checkpoints/step_SSSSSSSS.pt` (`train.checkpoint_format: full`) or `checkpoints/step_SSSSSSSS/` (`sharded`)
  every `train.checkpoint_every` steps ([Fault tolerance](fault-tolerance.md#fault-tolerance)).
- `final.pt` at the end: `{"model": state_dict, "step": int, "config": dict, "world_size": int}`, loadable with
  `torch.load(path, weights_only=True)`.
- `tensorboard/`: TensorBoard events of every step (`train.tensorboard`).
- `launcher.log` under `--nproc`: torch's elastic agent log, with any worker's traceback.

Rank 0 (only rank 0) shows a progress bar with the loss and lr when stderr is a terminal, and otherwise prints a
line every `train.log_every` steps. `disttrain verify` trains the N-process run into `{out_dir}/distributed` and
the one-process reference into `{out_dir}/reference`, then compares
([Verification](verification.md#verification-whole-runs-and-step-wise)). `disttrain plot RUN_DIR [RUN_DIR ...]`
draws the loss, the lr
and the gradient norm per step from each run's metrics.jsonl, the runs overlaid, into one PNG (1500x400 pixels):
`disttrain plot runs/a runs/b --out ab.png`.
"""

_CONFIG_INTRO = """\
## Configuration

Precedence: defaults < YAML file < `--set section.key=value` (repeatable, values parsed as YAML). Unknown
keys, wrong types and out-of-range or inconsistent values are rejected with one line naming the key (exit 2).
The batch size is global; per-rank sizes are derived (every rank needs at least one sample: B >= W).
`disttrain config CONFIG [--set ...]` prints the resolved config.
"""


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _usage(parser: argparse.ArgumentParser) -> str:
    """argparse's usage line at a fixed width (the terminal's width would change the file)."""
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """A table of a parser's arguments: name, default, meaning."""
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + (action.metavar or action.dest.upper())
            default = "" if action.default in (None, False, [], argparse.SUPPRESS) else f"`{action.default}`"
        else:
            name, default = action.metavar or action.dest.upper(), ""
        text = action.help or ""
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| `{_cell(name)}` | {default} | {_cell(text)} |")
    return rows


def _section(title: str, parser: argparse.ArgumentParser, what: str) -> list[str]:
    lines = [f"### {title}", "", what, "", "```", _usage(parser), "```", ""]
    if any(not isinstance(a, argparse._HelpAction) for a in parser._actions):
        lines += _options(parser) + [""]
    return lines


def reference_markdown() -> str:
    """The whole of docs/reference.md."""
    from .. import bench, demos
    from ..observe import plot
    from .main import _parser

    top = _parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = [_HEADER, "## Commands", ""]
    for name, sub in commands.choices.items():
        if name == "bench":
            lines += ["### disttrain bench", "", _sentence(helps[name]), "", "```",
                      "disttrain bench                      # lists the benchmarks",
                      "disttrain bench NAME [options] [--json]", "```", ""]
            for bench_name, what in bench.BENCHMARKS.items():
                lines += _section(f"disttrain bench {bench_name}", bench.parser(bench_name), _sentence(what))
        elif name == "demo":
            lines += _section("disttrain demo", demos._parser("disttrain demo"), _sentence(helps[name]))
        elif name == "plot":
            lines += _section("disttrain plot", plot._parser("disttrain plot"), _sentence(helps[name]))
        elif name == "data":
            data_commands = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            data_helps = {choice.dest: choice.help for choice in data_commands._choices_actions}
            for data_name, data_sub in data_commands.choices.items():
                data_sub.prog = f"disttrain data {data_name}"
                lines += _section(data_sub.prog, data_sub, _sentence(data_helps[data_name]))
        else:
            sub.prog = f"disttrain {name}"
            lines += _section(sub.prog, sub, _sentence(helps[name]))
    lines += [_EXIT_CODES, _RUN_DIR, _CONFIG_INTRO, "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {_cell(kind)} | `{default}` | {_cell(meaning)} |"
              for key, kind, default, meaning in reference_table()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")

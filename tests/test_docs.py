"""The documentation (README.md and docs/*.md) against the code: commands, links, paths, the reference.

Commands, against the real argument parsers: every command parses as typed, nothing is run. Every ``disttrain ...``, ``torchrun ... -m disttrain ...``, ``.venv/bin/...``, ``python -m ...`` and
``launch/*.sh`` command in the README's code blocks, and every inline code span that is a full command, is
checked: the subcommand (benchmark, demo) exists, every option is spelled exactly as its parser defines it
(argparse would accept an abbreviation), the arguments parse, the config file exists, and its ``--set``
overrides name existing keys with valid values (disttrain.config.load_config). A synopsis (``CONFIG``,
``[--nproc N]``, ``...``) and an inline command without its config file have their options checked only.
A made-up option, key, value, file or subcommand makes the test fail (test_drift_is_caught).

Links: every relative link and image resolves to a file of the repository, and every ``#anchor`` to a heading of
the target page (GitHub's slugs). Paths: every inline code span that names a file of the repository
(``disttrain/parallel/ddp.py``, ``configs/demo.yaml``) names one that exists, and every ``from disttrain... import``
in a Python block imports. Reference: docs/reference.md is what ``python -m disttrain.cli.reference`` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from disttrain import bench, demos
from disttrain.cli.main import _parser as cli_parser
from disttrain.observe import plot
from disttrain.config import check_world_size
from disttrain.config import load_config, reference_table
from disttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")  # FOO=bar before a command
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|[\[\]|]|\.\.\.")  # CONFIG, N, [--set ...], NAME|all


def commands(text: str) -> list[tuple[int, str, bool]]:
    """(line, command, from a code block) for each command-like line of fenced blocks and inline code."""
    found, outside, fence = [], [], None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else i
            outside.append("")
        elif fence is not None:
            start = i + 1
            while line.endswith("\\") and i + 1 < len(lines):  # a continued command is one command
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
                outside.append("")
            found += [(start, part.strip(), True) for part in line.split("&&")]
            outside.append("")
        else:
            outside.append(line)
        i += 1
    prose = "\n".join(outside)
    for match in re.finditer(r"`([^`]+)`", prose):
        found.append((prose.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split()), False))
    return found


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, with argparse's exit turned into an AssertionError that quotes its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None


def _options(parser: argparse.ArgumentParser, tokens: list[str]) -> None:
    """Every option among ``tokens`` is spelled exactly as ``parser`` defines it (argparse would accept an
    abbreviation); a synopsis's brackets are not part of the name."""
    for token in tokens:
        option = token.strip("[]").split("=")[0]
        if re.fullmatch(r"--[A-Za-z][\w-]*|-[A-Za-z]", option):
            assert option in parser._option_string_actions, f"{parser.prog}: no option {option}"


@functools.cache
def _cli_parser() -> argparse.ArgumentParser:
    return cli_parser()  # built once: parsing does not change a parser


def _subparser(name: str) -> argparse.ArgumentParser:
    choices = next(a for a in _cli_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert name in choices, f"disttrain: no command {name!r}"
    return choices[name]


def check_disttrain(argv: list[str], synopsis: bool) -> None:
    assert argv, "disttrain without a command"
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not rest:
            return  # lists the benchmarks
        if PLACEHOLDER.search(rest[0]):  # `bench [NAME [options] [--json]]`: options of some benchmark
            for option in re.findall(r"--[\w-]+", " ".join(rest)):
                assert any(option in bench.parser(n)._option_string_actions for n in bench.BENCHMARKS), option
            return
        assert rest[0] in bench.BENCHMARKS, f"disttrain bench: no benchmark {rest[0]!r}"
        parser = bench.parser(rest[0])
        _options(parser, rest[1:])
        if not synopsis:
            args = _parse(parser, rest[1:])
            if getattr(args, "overrides", None):
                _load(None, args.overrides)
        return
    if command in ("demo", "plot"):
        parser = demos._parser("disttrain demo") if command == "demo" else plot._parser("disttrain plot")
        _options(parser, rest)
        if not synopsis:
            args = _parse(parser, rest)
            if command == "demo":
                assert args.name == "all" or args.name in demos.DEMOS, f"disttrain demo: no demo {args.name!r}"
        return
    if command == "check":  # check's own options come before --; after it, the script and its arguments
        split = rest.index("--") if "--" in rest else len(rest)
        _options(_subparser("check"), rest[:split])
        if synopsis or "--" not in rest:  # a mention in prose (`disttrain check`): its options only
            return
        _parse(_cli_parser(), argv)
        target = rest[split + 1:]
        assert target, "disttrain check without a script after --"
        if target[:2] == ["-m", "disttrain"]:
            check_disttrain(target[2:], synopsis)
        elif target[0] != "-m":
            assert (ROOT / target[0]).is_file(), f"no script {target[0]}"
        return
    parser = _subparser(command)
    while rest and not rest[0].startswith("-"):  # a nested command (disttrain data export ...) has its own options
        nested = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if nested is None or rest[0] not in nested.choices:
            break
        parser, rest = nested.choices[rest[0]], rest[1:]
    _options(parser, rest)
    if synopsis:
        return
    args = _parse(_cli_parser(), argv)
    if command in ("data", "checkpoint"):  # no config file: their arguments parsed is all
        return
    assert (ROOT / args.config).is_file(), f"no config file {args.config}"
    cfg = _load(args.config, args.overrides)
    if getattr(args, "nproc", None):
        try:
            check_world_size(cfg, args.nproc)
        except ConfigError as exc:
            raise AssertionError(str(exc)) from None
    if getattr(args, "stop_at", None) is not None:
        assert 1 <= args.stop_at < cfg.train.steps, f"--stop-at {args.stop_at} with train.steps={cfg.train.steps}"
        assert cfg.train.checkpoint_every, "--stop-at without checkpoints"
    if getattr(args, "max_restarts", 0):
        assert cfg.train.checkpoint_every, "--max-restarts without checkpoints"


def _load(config: str | None, overrides: list[str]):
    try:
        return load_config(None if config is None else ROOT / config, overrides)
    except ConfigError as exc:
        raise AssertionError(str(exc)) from None


def check(command: str, from_block: bool) -> bool:
    """Check one command; False when it is not one this test knows (docker, sbatch, kill, prose)."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        return False
    while tokens and ENV.match(tokens[0]):
        tokens.pop(0)
    if not tokens:
        return False
    head, rest = tokens[0], tokens[1:]
    # A synopsis, or a request for help (which argparse answers by exiting): its options are checked, not parsed.
    synopsis = any(PLACEHOLDER.search(t) or t in ("-h", "--help") for t in tokens)
    if head in ("disttrain", ".venv/bin/disttrain"):
        if not rest:
            return False  # the program's name in prose
        # Inline, `disttrain train --nproc 2` names options of a command, not a command to type.
        needs_config = rest[0] in ("train", "verify", "config") and not any(t.endswith(".yaml") for t in rest)
        check_disttrain(rest, synopsis or (needs_config and not from_block))
        return True
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
        script = next((i for i, t in enumerate(rest) if t.endswith(".py")), None)
        if "-m" not in rest and script is not None:  # torchrun [options] SCRIPT.py [the script's own arguments]
            _options(parser, rest[:script])
            assert (ROOT / rest[script]).is_file(), f"no script {rest[script]}"
            return True
        split = rest.index("-m") if "-m" in rest else len(rest)
        _options(parser, rest[:split])
        inner = rest[split + 2:]
        if split < len(rest):
            assert rest[split + 1] == "disttrain", f"torchrun runs -m {rest[split + 1]}, not disttrain"
            complete = any(t.endswith(".yaml") for t in inner)
            check_disttrain(inner, synopsis or not (complete or from_block))
            if complete and not synopsis:
                args = _parse(parser, rest)
                assert args.module and args.training_script == "disttrain"
        return True
    if head.startswith("launch/") and head.endswith(".sh"):
        assert (ROOT / head).is_file(), f"no script {head}"
        if not from_block and not rest:
            return True  # the script's name in prose
        check_disttrain(["train", *rest], synopsis)  # the scripts pass their arguments to disttrain train
        return True
    if head == ".venv/bin/pip":
        section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
        extras = re.findall(r"^([\w-]+) = \[", section, flags=re.M)
        for flag, value in zip(rest, rest[1:]):
            if flag == "-c":
                assert (ROOT / value).is_file(), f"no constraints file {value}"
            if flag == "-e" and "[" in value:
                for extra in value.split("[")[1].rstrip("]").split(","):
                    assert extra in extras, f"pyproject.toml has no extra {extra!r}"
        return True
    if head in ("python", ".venv/bin/python", "python3") and rest[:1] == ["-m"] and len(rest) > 1:
        module = rest[1]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "tests.measure_stepwise":
            from tests import measure_stepwise

            _options(measure_stepwise.parser(), rest[2:])
            _parse(measure_stepwise.parser(), rest[2:])
        return True
    return False


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_commands_parse():
    checked, failures = 0, []
    for page in PAGES:
        for line, command, from_block in commands(page.read_text()):
            try:
                checked += check(command, from_block)
            except AssertionError as exc:
                failures.append(f"{_name(page)}:{line}: {command}: {exc}")
    assert not failures, "\n".join(failures)
    assert checked >= 100  # the extraction found the pages' commands, not nothing


def test_readme_keeps_the_quickstart_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert ("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e \".[test]\" && "
            ".venv/bin/python -m pytest\n") in blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _outside_code(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            found.append((number, line))
    return found


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    names = set()
    for _, line in _outside_code(text):
        if match := re.match(r"#{1,6} +(.+?) *#*$", line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            names.add(f"{base}-{count}" if count else base)
            seen[base] = count + 1
    return names


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?: \"[^\"]*\")?\)")


def links(page: Path, text: str) -> Iterator[tuple[int, str, Path, str]]:
    """(line, target, file, anchor) of each relative link and image in ``text`` (the contents of ``page``)."""
    for number, line in _outside_code(text):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # a link inside code is no link
            if not re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
                path, _, anchor = target.partition("#")
                yield number, target, (page.parent / path).resolve() if path else page, anchor


def broken_links(page: Path, text: str) -> list[str]:
    """A description of each relative link or anchor in ``text`` (the contents of ``page``) that resolves to
    nothing."""
    failures = []
    for number, target, where, anchor in links(page, text):
        if not where.exists() or ROOT not in where.parents:
            failures.append(f"{_name(page)}:{number}: {target}: no file {target.partition('#')[0]}")
        elif anchor and where.suffix == ".md":
            if anchor not in anchors(text if where == page else where.read_text()):
                failures.append(f"{_name(page)}:{number}: {target}: no heading #{anchor} in {where.name}")
    return failures


def test_links_and_anchors_resolve():
    failures = [failure for page in PAGES for failure in broken_links(page, page.read_text())]
    assert not failures, "\n".join(failures)


# A file of the repository named in inline code: `disttrain/parallel/ddp.py`, `configs/demo.yaml`, `launch/k8s/`.
REPO_PATH = re.compile(r"(?:disttrain|configs|tests|examples|launch|docker|tools|docs|\.ci)/[\w./-]*")
MADE_BY_RUNS = ("docker/wheels/",)  # written by a command the page shows (docker/wheelhouse.sh)


def missing_paths(page: Path, text: str) -> list[str]:
    failures = []
    for number, line in _outside_code(text):
        for span in re.findall(r"`([^`]+)`", line):
            if REPO_PATH.fullmatch(span) and span not in MADE_BY_RUNS and not (ROOT / span).exists():
                failures.append(f"{_name(page)}:{number}: `{span}`: no such file in the repository")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for module, names in re.findall(r"^\s*from (disttrain[\w.]*) import ([\w, ]+)$", block, flags=re.M):
            try:
                imported = importlib.import_module(module)
            except ImportError:
                failures.append(f"{_name(page)}: from {module} import ...: no module {module}")
                continue
            failures += [f"{_name(page)}: from {module} import {name}: no such name"
                         for name in (n.strip() for n in names.split(",")) if not hasattr(imported, name)]
    return failures


def test_paths_and_imports_exist():
    failures = [failure for page in PAGES for failure in missing_paths(page, page.read_text())]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- what a run writes, placeholders

def shared_out_dirs(configs: list[Path]) -> list[str]:
    """Each train.out_dir that two configs share: the second's run clears the first's checkpoints, and a later
    verify --against reads a mixture."""
    owners: dict[str, list[str]] = {}
    for path in configs:
        owners.setdefault(load_config(path, []).train.out_dir, []).append(path.name)
    return [f"{', '.join(names)} share train.out_dir {out}" for out, names in owners.items() if len(names) > 1]


def test_every_config_has_its_own_out_dir():
    shared = shared_out_dirs(sorted((ROOT / "configs").glob("*.yaml")))
    assert not shared, "\n".join(shared)


# An HTML comment a writer left for later: invisible on the rendered page, so nobody reads it there.
PLACEHOLDER_COMMENT = re.compile(r"<!--(?:(?!-->).)*\b(?:goes here|TODO|TBD|FIXME|XXX|to be written)\b.*?-->",
                                 re.S | re.I)


def placeholder_comments(page: Path, text: str) -> list[str]:
    outside = "\n".join(line for _, line in _outside_code(text))
    return [f"{_name(page)}: placeholder {m.group(0)[:80]!r}" for m in PLACEHOLDER_COMMENT.finditer(outside)]


def test_no_placeholder_comments():
    failures = [f for page in PAGES for f in placeholder_comments(page, page.read_text())]
    assert not failures, "\n".join(failures)


@functools.cache
def _digits_files() -> frozenset[str]:
    """The files `disttrain data export digits DIR` writes, relative to DIR: its own loop, with the PNG encoding
    left out (a touch per file), so the names are exactly export's."""
    import tempfile
    from unittest import mock

    from disttrain.data.export import export_digits

    class _Touch:
        def save(self, path: Path) -> None:
            Path(path).touch()

    with tempfile.TemporaryDirectory() as tmp, mock.patch("PIL.Image.fromarray", lambda *a, **k: _Touch()):
        export_digits(Path(tmp))
        return frozenset(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.png"))


def export_comment_paths(page: Path, text: str) -> list[str]:
    """Paths named in the comment of a ``disttrain data export digits DIR`` command that the export does not
    write."""
    failures = []
    for line, command, from_block in commands(text):
        match = re.match(r"disttrain data export digits (\S+)\s+#(.*)", command)
        if not (from_block and match):
            continue
        out_dir, comment = match.group(1).rstrip("/"), match.group(2)
        for named in re.findall(rf"{re.escape(out_dir)}/([\w./-]+\.png)", comment):
            if named not in _digits_files():
                failures.append(f"{_name(page)}:{line}: {out_dir}/{named}: export digits writes no such file")
    return failures


def test_paths_in_export_comments_are_written_by_the_export():
    failures = [f for page in PAGES for f in export_comment_paths(page, page.read_text())]
    assert not failures, "\n".join(failures)


def test_what_is_written_placeholders_and_shared_out_dirs_are_caught(tmp_path):
    text = "```bash\ndisttrain data export digits data/d   # data/d/0/0000.png ... data/d/9/1796.png\n```\n"
    assert export_comment_paths(README, text) == [
        "README.md:2: data/d/9/1796.png: export digits writes no such file"]
    assert not export_comment_paths(README, text.replace("9/1796", "8/1796"))
    assert placeholder_comments(README, "a\n<!-- The token format's section goes here. -->\n")
    assert not placeholder_comments(README, "```html\n<!-- TODO inside code -->\n```\n")
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("train: {out_dir: runs/same}\n")
    assert shared_out_dirs(sorted(tmp_path.glob("*.yaml"))) == ["a.yaml, b.yaml share train.out_dir runs/same"]


def test_reference_is_current():
    """docs/reference.md is generated; regenerate it with ``python -m disttrain.cli.reference > docs/reference.md``."""
    from disttrain.cli.reference import reference_markdown

    text = reference_markdown()
    assert (ROOT / "docs" / "reference.md").read_text() == text, \
        "docs/reference.md is stale: python -m disttrain.cli.reference > docs/reference.md"
    assert all(f"`{key}`" in text for key, *_ in reference_table())  # every config key is documented


@pytest.mark.parametrize("text, error", [
    ("[a](docs/nothing.md)", "no file docs/nothing.md"),
    ("[a](#nowhere)\n# Somewhere", "no heading #nowhere"),
    ("[a](docs/reference.md#no-such-key)", "no heading #no-such-key in reference.md"),
    ("see `disttrain/comm.py`", "`disttrain/comm.py`: no such file"),
    ("```python\nfrom disttrain.syncbn import SyncBatchNorm\n```", "no module disttrain.syncbn"),
    ("```python\nfrom disttrain.randomness import uniformm\n```", "import uniformm: no such name"),
])
def test_link_and_path_drift_is_caught(text, error):
    failures = broken_links(README, text) + missing_paths(README, text)
    assert any(error in failure for failure in failures), failures


def test_anchors_are_githubs():
    text = "# Why W processes equal one device\n## `comm.impl: fsdp` (ZeRO-3)\n## Notes\n## Notes\n```\n# not a heading\n```"
    assert anchors(text) == {"why-w-processes-equal-one-device", "commimpl-fsdp-zero-3", "notes", "notes-1"}


@pytest.mark.parametrize("command, error", [
    ("disttrain train configs/demo.yaml --nprocs 4", "no option --nprocs"),
    ("disttrain train configs/demo.yaml --nproc four", "invalid int value: 'four'"),
    ("disttrain train configs/demo.yaml --npro 4", "no option --npro"),  # argparse alone would accept it
    ("disttrain train configs/demo.yaml --set train.stepz=3", "train.stepz"),
    ("disttrain train configs/demo.yaml --set train.steps=many", "train.steps"),
    ("disttrain verify configs/nothing.yaml", "no config file configs/nothing.yaml"),
    ("disttrain train configs/demo.yaml --nproc 4 --stop-at 50", "--stop-at 50 with train.steps=20"),
    ("disttrain verify configs/demo.yaml --nproc 31", "global_batch_size"),
    ("disttrain trian configs/demo.yaml", "no command 'trian'"),
    ("disttrain bench stepp", "no benchmark 'stepp'"),
    ("disttrain bench step --set model.hiden=128", "model.hiden"),
    ("disttrain demo reduse", "no demo 'reduse'"),
    ("torchrun --nproc-per-nod=2 -m disttrain train configs/demo.yaml", "no option --nproc-per-nod"),
    ("torchrun --nproc_per_node=2 -m disttrain train configs/demo.yaml --resum", "no option --resum"),
    ("disttrain train CONFIG [--nproc N] [--restart]", "no option --restart"),
    ("launch/single_node.sh configs/demo.yaml", "no script launch/single_node.sh"),
    (".venv/bin/pip install -c constraints.txt -e '.[demos]'", "no extra 'demos'"),
])
def test_drift_is_caught(command, error):
    with pytest.raises(AssertionError, match=re.escape(error)):
        check(command, from_block=True)


def test_extraction_finds_blocks_continuations_and_inline_commands():
    text = ("Run `disttrain demo reduce` or:\n\n```bash\nA=1 disttrain train configs/demo.yaml \\\n"
            "    --nproc 2   # a comment\n.venv/bin/pip install x && .venv/bin/disttrain config configs/demo.yaml\n```\n")
    assert commands(text) == [
        (4, "A=1 disttrain train configs/demo.yaml --nproc 2   # a comment", True),
        (6, ".venv/bin/pip install x", True), (6, ".venv/bin/disttrain config configs/demo.yaml", True),
        (1, "disttrain demo reduce", False)]


def test_architecture_names_every_module():
    """docs/architecture.md's layout names every module of the package (the demos and benchmarks by name)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "disttrain"
    unnamed = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if path.name in ("__init__.py", "__main__.py") and len(relative.parts) > 1:
            continue
        named = path.name in text or (relative.parts[0] in ("demos", "bench") and re.search(rf"\b{path.stem}\b", text))
        if not named:
            unnamed.append(str(relative))
    assert not unnamed, f"docs/architecture.md does not name {unnamed}"


def test_every_page_is_reachable_from_the_readme():
    """A page in docs/ that no link leads to, from the README or a page it leads to, is lost to readers."""
    reached, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for _, _, where, _ in links(page, page.read_text()):
            if where.suffix == ".md" and where.exists() and where not in reached:
                reached.add(where)
                todo.append(where)
    lost = [_name(page) for page in PAGES if page not in reached]
    assert not lost, f"no link leads to {lost}"

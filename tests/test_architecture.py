"""The package's shape: folders by concern, no import cycles (imports inside functions count too, and
annotation-only imports of the schema), no module far past 300 lines, names listed once, and collectives only in
parallel/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "disttrain"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SCHEMA = "disttrain.config.schema"


def _imports_schema(node: ast.AST, package: str) -> bool:
    if not isinstance(node, ast.ImportFrom):
        return False
    base = package
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
    return target == SCHEMA


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (functions included; annotation-only
    imports under TYPE_CHECKING excluded)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text())
        # Imports for type annotations only (under `if TYPE_CHECKING:`) never run, but an annotation-only import
        # of the schema still says "this module depends on the config": those count, the others do not.
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only and not _imports_schema(node, package):
                continue
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            edges |= {c for c in candidates if c in modules and c != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package's __init__ importing its own modules is not one."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package's __init__ re-exporting its own submodule
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_leaves_import_nothing_of_the_project_but_errors():
    graph = import_graph()
    assert graph["disttrain.errors"] == set()
    assert graph["disttrain.factory"] == {"disttrain.errors"}


def test_no_module_is_far_past_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 330}
    assert not long, f"modules over 330 lines (split them): {long}"


# The package face (__init__, __main__, the users' test harness) and the three modules every concern shares.
FLAT = {"__init__.py", "__main__.py", "testing.py", "errors.py", "factory.py", "randomness.py"}


def test_nothing_flat_but_the_face_and_the_shared_modules():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in FLAT)
    assert not flat, f"modules directly in disttrain/ (put them in the subpackage of their concern): {flat}"


def test_the_schema_imports_no_validator_and_no_reader():
    assert graph_targets("disttrain.config.schema") <= {"disttrain.errors", "disttrain.data.formats",
                                                        "disttrain.parallel.registry"}


def graph_targets(module: str) -> set[str]:
    return import_graph()[module]


def test_registries_are_leaves_and_name_each_thing_once():
    """A format, a model and a strategy are each named in one table; the schema and the validator read it."""
    import typing

    from disttrain.config import CommConfig
    from disttrain.config.validate import BUILTIN_DATA, BUILTIN_MODELS
    from disttrain.data.formats import FORMATS
    from disttrain.models.registry import MODELS
    from disttrain.parallel.registry import STRATEGIES
    from disttrain.parallel.strategies import strategy_class

    for leaf in ("disttrain.data.formats", "disttrain.models.registry", "disttrain.parallel.registry"):
        assert graph_targets(leaf) == set(), leaf
    assert BUILTIN_DATA == tuple(FORMATS) and BUILTIN_MODELS == tuple(MODELS)
    assert typing.get_args(typing.get_type_hints(CommConfig)["impl"]) == tuple(STRATEGIES)
    for name in STRATEGIES:
        assert strategy_class(name).__name__.endswith("Sync")


# Who may call a collective: the strategies and the process group (parallel/), and the benchmarks and demos,
# whose experiments are collectives by design. Everyone else asks parallel/ (collectives.sum_over_ranks, ...).
COLLECTIVE = ("all_reduce(", "broadcast(", "all_gather(", "reduce_scatter(", "broadcast_object_list(",
              "all_gather_object(", "barrier(", "all_to_all(")


def test_only_parallel_calls_collectives():
    allowed = ("parallel/", "bench/", "demos/")
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if not str(p.relative_to(PACKAGE)).startswith(allowed)
                     and any(f"dist.{c}" in p.read_text() for c in COLLECTIVE))
    assert not callers, f"collectives outside parallel/: {callers}"

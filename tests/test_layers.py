"""The code's shape, checked: packages import in one direction, functions fit on a screen, the export
code is typed on the built model.

Units are the modules and packages directly under ``utune/`` (``graph``, ``tuners``, ``spec``, ``api``...).
Imports under ``if TYPE_CHECKING:`` are for type checkers only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

UTUNE = Path(__file__).resolve().parents[1] / "utune"
HIGHER = {"spec", "api", "tuned", "train", "export", "cli"}  # what graph and tuners must not import
MAX_LINES = 60


def _module(path: Path) -> str:
    parts = path.relative_to(UTUNE).with_suffix("").parts
    return ".".join(("utune", *parts)).removesuffix(".__init__")


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "utune"


def _typing_only(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            ids |= {id(n) for n in ast.walk(node)}
    return ids


def _imports(path: Path) -> set[str]:
    """utune modules ``path`` imports at run time (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text())
    skip = _typing_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("utune")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("utune"):
            if node.module == "utune":  # from utune import _output, __version__
                found |= {f"utune.{a.name}" for a in node.names if not a.name.startswith("__")}
            else:
                found.add(node.module or "")
    return found


def unit_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in UTUNE.rglob("*.py"):
        me = _unit(_module(path))
        for other in _imports(path):
            if _unit(other) != me:
                edges.setdefault(me, set()).add(_unit(other))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (found := visit(v)) is not None:
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state and (found := visit(u)) is not None:
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    edges = unit_graph()
    edges.pop("utune", None)  # the package's facade (utune.build, utune.load_spec) imports lazily on call
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges) or [])}"


def test_graph_and_tuners_import_no_higher_layer() -> None:
    edges = unit_graph()
    for low in ("graph", "tuners"):
        assert not edges.get(low, set()) & HIGHER, f"utune.{low} imports {sorted(edges[low] & HIGHER)}"
    assert "tuners" not in edges.get("graph", set()), "the engine (graph) must not know the kinds (tuners)"


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in UTUNE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(UTUNE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_no_tuner_file_touches_graph_nodes() -> None:
    """Kinds plan (utune.graph.manifest values); only the rewriter inserts nodes."""
    for path in (UTUNE / "tuners").glob("*.py"):
        text = path.read_text()
        assert "fx.Node" not in text and "torch.fx" not in text and "from torch import fx" not in text, path.name
        assert ".graph." not in text.replace("utune.graph.", ""), path.name


def test_export_is_typed_on_the_built_model() -> None:
    for path in (UTUNE / "export").glob("*.py"):
        assert "built: Any" not in path.read_text(), path.name

"""The code's shape, checked: the package is an ordered list of layers, each module imports only its own
layer or lower ones, no module imports itself back (``TYPE_CHECKING`` and lazy imports counted), functions fit
on a screen, the export code is typed on the build record.

Every module under ``utune/`` must be named by exactly one layer (a new module must be placed: add it here
and to docs/architecture.md).
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

UTUNE = Path(__file__).resolve().parents[1] / "utune"
MAX_LINES = 60

# lowest first: a module may import its own layer and the layers above it in this list, never one below
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "utune._version",
            "utune.errors",
            "utune._output",
            "utune._reference",
            "utune._schema",
            "utune._fs",
            "utune._imports",
            "utune._signals",
            "utune._lock",
        ),
    ),
    ("models", ("utune.models", "utune.models.*")),  # the one place that knows timm / torchvision names, weights
    ("graph", ("utune.graph", "utune.graph.*")),  # trace, sites, select, the rewriter, the manifest
    ("tuners", ("utune.tuners", "utune.tuners.*", "utune.kinds")),  # the kinds (utune.kinds: their public API)
    ("spec", ("utune.spec", "utune.spec.*")),
    ("record", ("utune.engine", "utune.engine.record")),  # what a build returns: every consumer reads it
    ("data and training", ("utune.data", "utune.data.*", "utune.train", "utune.train.*")),
    ("tuned model and export", ("utune.engine.tuned_ops", "utune.engine.tuned", "utune.export", "utune.export.*")),
    ("build", ("utune.engine.build", "utune.engine.sets", "utune.engine.sets_code")),
    # train, eval, predict, compare; utune.testing: the contract kit any kind can run
    ("workflows", ("utune.runs", "utune.runs.*", "utune.compare", "utune.compare.*", "utune.testing")),
    ("facade", ("utune",)),  # utune.build, utune.load_spec...: imports lazily on call
    ("cli", ("utune.cli", "utune.cli.*", "utune.__main__")),
]


def _module(path: Path) -> str:
    parts = path.relative_to(UTUNE).with_suffix("").parts
    return ".".join(("utune", *parts)).removesuffix(".__init__")


MODULES = {_module(p): p for p in UTUNE.rglob("*.py")}


def _resolve(name: str) -> str:
    """The utune module an import names (``utune.graph.manifest.Entry`` -> ``utune.graph.manifest``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(path: Path) -> set[str]:
    """utune modules ``path`` imports: at run time, lazily inside functions, or for type checkers only."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.startswith("utune")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("utune"):
            for a in node.names:  # `from utune.graph import manifest` names a module; `import Entry` does not
                full = f"{node.module}.{a.name}"
                found.add(full if full in MODULES else _resolve(node.module or ""))
    found.discard(_module(path))
    found.discard("")
    return found


def layer_of(module: str) -> int:
    hits = [i for i, (_, pats) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in pats)]
    assert len(hits) == 1, f"{module} is in {len(hits)} layers; name it in exactly one of tests/test_layers.py's"
    return hits[0]


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


def test_every_module_is_in_exactly_one_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_modules_import_only_their_layer_or_lower_ones() -> None:
    wrong = []
    for module, path in sorted(MODULES.items()):
        mine = layer_of(module)
        for other in sorted(imports(path)):
            if layer_of(other) > mine:
                wrong.append(f"{module} ({LAYERS[mine][0]}) imports {other} ({LAYERS[layer_of(other)][0]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules() -> None:
    edges = {m: imports(p) for m, p in MODULES.items()}
    found = _cycle(edges)
    assert found is None, f"import cycle: {' -> '.join(found or [])}"


def test_the_checks_see_type_checking_and_lazy_imports() -> None:
    """The import scan counts what a type checker and a function body import (the old check skipped them)."""
    assert "utune.spec" in imports(UTUNE / "engine" / "record.py")  # under TYPE_CHECKING only
    assert "utune.export.merge" in imports(UTUNE / "engine" / "tuned_ops.py")  # inside a method


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

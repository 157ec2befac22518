"""YAML with positions: parse once, keep the node tree, and map an error's key path to a line.

PyYAML's ``safe_load`` throws positions away and silently keeps the last of two equal keys; a spec
error without a line number, or a typo that quietly overrides a setting, costs the user time. So
we compose the node tree ourselves, check it for duplicate keys, build the data from it, and keep
it to answer "which line is ``tuners.0.dim`` on?".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class YamlProblem:
    """A problem found while reading YAML: 1-based line (and column when the parser gave one)."""

    line: int
    column: int | None
    message: str


class YamlSyntaxError(Exception):
    """The text is not YAML (or not one document); ``problem`` says where and why."""

    def __init__(self, problem: YamlProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


# Limits on what a spec may be (spec files and the specs embedded in tuner files alike, which may come from
# anyone). A real spec is a few KB, a few hundred nodes, a dozen levels deep; these are 100x that and more.
MAX_BYTES = 1 << 20  # 1 MiB of text: PyYAML's pure-Python parser reads ~1 MB in a few seconds
MAX_DEPTH = 64  # nesting levels (the composer recurses: 5000 levels end in a RecursionError)
MAX_NODES = 100_000  # nodes once every alias is expanded: nine levels of nine aliases ("billion laughs")
# are ~1 KB of text and 387 million nodes; walking them (duplicate keys, validation) would take hours


class _LimitedLoader(yaml.SafeLoader):
    """The safe loader, refusing documents nested deeper than :data:`MAX_DEPTH` while composing."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlSyntaxError(
                    YamlProblem(mark.line + 1, mark.column + 1, f"nested deeper than {MAX_DEPTH} levels")
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_nodes(root: Node) -> int:
    """How many nodes the document holds with its aliases expanded (each shared node counted per use),
    in time linear in the distinct nodes; stops counting past :data:`MAX_NODES`."""
    sizes: dict[int, int] = {}

    def size(node: Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > MAX_DEPTH:  # an alias inside its own anchor (a cycle) also ends here
            return MAX_NODES + 1
        n = 1
        if isinstance(node, MappingNode):
            for k, v in node.value:
                n += size(k, depth + 1) + size(v, depth + 1)
                if n > MAX_NODES:
                    break
        elif isinstance(node, SequenceNode):
            for item in node.value:
                n += size(item, depth + 1)
                if n > MAX_NODES:
                    break
        sizes[id(node)] = n
        return n

    return size(root, 0)


def parse_yaml(text: str) -> tuple[Any, Node | None]:
    """Parse one YAML document with the safe loader; return ``(data, root node)``.

    Raises :class:`YamlSyntaxError` for text the parser rejects (with the parser's line, column and
    problem), and for a document beyond the limits (:data:`MAX_BYTES` of text, :data:`MAX_DEPTH` levels,
    :data:`MAX_NODES` nodes with aliases expanded), before building anything from it. An empty document
    gives ``(None, None)``.
    """
    size = len(text.encode("utf-8", errors="replace")) if len(text) * 4 > MAX_BYTES else len(text)
    if size > MAX_BYTES:
        raise YamlSyntaxError(
            YamlProblem(1, None, f"the document is {size:,} bytes, larger than the {MAX_BYTES:,} a spec may be")
        )
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node) > MAX_NODES:
            raise YamlSyntaxError(
                YamlProblem(
                    1,
                    None,
                    f"it holds more than {MAX_NODES:,} values once its aliases are expanded (a spec holds "
                    "hundreds); write the values out instead of nesting aliases",
                )
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise YamlSyntaxError(_syntax_problem(exc)) from None
    except yaml.YAMLError as exc:  # unmarked errors (rare): no position to give
        raise YamlSyntaxError(YamlProblem(1, None, str(exc))) from None
    except RecursionError:  # deep flow collections recurse in the parser's helpers too
        raise YamlSyntaxError(YamlProblem(1, None, f"nested deeper than {MAX_DEPTH} levels")) from None
    finally:
        loader.dispose()
    return data, node


def _syntax_problem(exc: yaml.MarkedYAMLError) -> YamlProblem:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem and exc.context_mark is not None:
        problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
    if mark is None:
        return YamlProblem(1, None, problem)
    return YamlProblem(mark.line + 1, mark.column + 1, problem)


def duplicate_keys(node: Node | None, loc: Loc = ()) -> list[tuple[Loc, int, str]]:
    """Every mapping key written twice, as ``(key path, line, message)``; YAML merge keys are skipped."""
    found: list[tuple[Loc, int, str]] = []
    if isinstance(node, MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":
                if key in first:
                    found.append((loc + (key,), line, f"duplicate key {key!r} (first written on line {first[key]})"))
                else:
                    first[key] = line
            found.extend(duplicate_keys(value_node, loc + ((key if key is not None else "?"),)))
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            found.extend(duplicate_keys(item, loc + (i,)))
    return found


def line_of(root: Node | None, loc: Sequence[str | int]) -> int:
    """The line of the deepest node on ``loc`` that exists (the key's line for mapping entries).

    A missing key points at its nearest written ancestor, which is where the user would add it.
    """
    if root is None:
        return 1
    node: Node = root
    line = root.start_mark.line + 1
    for part in loc:
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.value == str(part):
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# --- dotted key paths into loaded data -----------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """A ``key.path=value`` applied to loaded data."""

    text: str
    path: Loc  # where the value was written
    owner: Loc  # the shortest path it created or replaced: problems under it are the override's


def apply_override(data: dict[str, Any], text: str) -> Override:
    """Set ``key.path=value`` in ``data`` (value read as YAML); mappings missing on the way are created.

    Whether a created key is allowed is the schema's call, made later, so that ``train.lr=1e-3``
    works when the file has no ``train:`` section. Raises ValueError for a malformed override.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError("expected key.path=value")
    parts = key.split(".")
    if any(not part.strip() for part in parts):
        raise ValueError(f"empty segment in key {key!r}")
    if raw.lstrip().startswith(("*", "&")):  # a YAML alias/anchor, not a glob: say so plainly
        raise ValueError(f"value {raw.strip()!r} is not valid YAML: quote a value starting with '*' or '&'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"value is not valid YAML ({problem}); quote it, e.g. key='**.bias'") from None
    node: Any = data
    path: list[str | int] = []
    owner: Loc | None = None
    for i, part in enumerate(parts):
        where = ".".join(map(str, path)) or "the top level"
        step: str | int = part
        if isinstance(node, list):
            if not part.isdigit():
                raise ValueError(f"{where} is a list: index it with a number, not {part!r}")
            step = int(part)
            if step >= len(node):
                raise ValueError(f"index {step} is out of range ({where} has {len(node)} items)")
        elif isinstance(node, dict):
            if owner is None and part not in node:
                owner = (*path, part)
            if i < len(parts) - 1 and node.get(part) is None:
                node[part] = {}
        else:
            raise ValueError(f"cannot index into {where}: it is a {type(node).__name__}, not a mapping or list")
        path.append(step)
        if i == len(parts) - 1:
            node[step] = value
        else:
            node = node[step]
    return Override(text, tuple(path), owner or tuple(path))


def written_loc(loc: Loc, data: Any, missing: bool = False) -> Loc:
    """The part of an error's ``loc`` the user wrote: pydantic adds union tags like ``'bool'``.

    With ``missing``, the last key may be absent (it is the required key being reported).
    """
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if (
            isinstance(data, dict)
            and part in data
            or (isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data))
        ):
            data = data[part]  # type: ignore[index]  # the isinstance checks above pair data's type with part's
            out.append(part)
            continue
        if missing and isinstance(data, dict) and i == len(loc) - 1:
            out.append(part)
        break
    return tuple(out)

"""All user-facing output goes through here: Rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

_out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, soft_wrap=True)


def console() -> Console:
    return _out


def print_json(obj: Any) -> None:
    """Plain JSON on stdout (no Rich markup or wrapping), for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    _err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        _err.print(f"[yellow]hint:[/] {hint}", markup=True, highlight=False)


def warn(message: str) -> None:
    if os.environ.get("UTUNE_QUIET") != "1":
        _err.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)


def info(message: str) -> None:
    _out.print(message, highlight=False)


def fmt_int(n: int) -> str:
    return f"{n:,}"


def table(title: str | None, columns: list[str], rows: list[list[Any]], justify: dict[str, str] | None = None) -> None:
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, justify=(justify or {}).get(c, "left"), overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    _out.print(t)


def tree(title: str, paths: list[tuple[str, str]]) -> None:
    """A tree from dotted paths (label per path), parents created as needed."""
    root = Tree(title)
    nodes: dict[str, Tree] = {"": root}
    for path, label in paths:
        parent = path.rpartition(".")[0] if "::" not in path else path.split("::")[0]
        while parent not in nodes:  # an ancestor not listed (e.g. depth-limited): attach to the nearest one
            parent = parent.rpartition(".")[0]
        nodes[path] = nodes[parent].add(label)
    _out.print(root)

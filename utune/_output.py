"""All user-facing output goes through here: Rich tables for people, JSON for scripts.

Two streams with one rule each. **stdout** carries the command's result: a table (``--format table``) or
exactly one JSON document (``--format json``). **stderr** carries everything else: progress, log lines,
notes such as "using the latest run", warnings and errors. In JSON mode the human lines that would go
to stdout (:func:`info`) go to stderr instead and tables are not drawn, so ``utune ... --format json |
python -m json.tool`` always parses.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

_out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, soft_wrap=True)
_json_mode = False


# C0 and C1 control characters but tab and newline: text read from a file (a tuner file's embedded spec)
# could otherwise retitle or clear the terminal, or hide lines, when printed
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def escape_control(text: str) -> str:
    """``text`` with its terminal control characters written as ``\\xNN`` (tab and newline kept)."""
    return text.translate(_CONTROL)


def set_json(on: bool) -> None:
    """Switch JSON mode on (the command prints one JSON document; everything else to stderr)."""
    global _json_mode
    _json_mode = on


def json_mode() -> bool:
    return _json_mode


def console() -> Console:
    return _out


def err_console() -> Console:
    return _err


def quiet() -> bool:
    """``UTUNE_QUIET=1``: no warnings, notes or progress (errors and results still print)."""
    return os.environ.get("UTUNE_QUIET", "") not in ("", "0")


def _plain(obj: Any) -> Any:
    """JSON-able: NaN/inf become null (not JSON), tuples lists, paths and other objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "as_dict"):  # a record (utune.engine.record.BuildReport)
        obj = obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def print_json(obj: Any) -> None:
    """Plain JSON on stdout (no Rich markup or wrapping), for scripts."""
    sys.stdout.write(json.dumps(_plain(obj), indent=2) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    """Messages are text, never markup: a path or a library's ``[file.cc:561]`` prints as it is."""
    _err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    if hint:
        _err.print(f"[yellow]hint:[/] {escape(hint)}", markup=True, highlight=False)


def warn(message: str) -> None:
    if not quiet():
        _err.print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False)


def note(message: str, *, markup: bool = False) -> None:
    """A line about what the command is doing (always stderr): "using the latest run ...", progress.
    ``markup=True``: the caller's Rich markup (it escapes what it interpolates)."""
    if not quiet():
        _err.print(message if markup else escape(message), markup=True, highlight=False)


def info(message: str, *, markup: bool = False) -> None:
    """A line of the human result (stdout); in JSON mode it goes to stderr."""
    if _json_mode:
        note(message, markup=markup)
    else:
        _out.print(message if markup else escape(message), highlight=False)


def fmt_int(n: int) -> str:
    return f"{n:,}"


def table(title: str | None, columns: list[str], rows: list[list[Any]], justify: dict[str, str] | None = None) -> None:
    if _json_mode:
        return
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, justify=(justify or {}).get(c, "left"), overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    _out.print(t)


def tree(title: str, paths: list[tuple[str, str]]) -> None:
    """A tree from dotted paths (label per path), parents created as needed."""
    if _json_mode:
        return
    root = Tree(title)
    nodes: dict[str, Tree] = {"": root}
    for path, label in paths:
        parent = path.rpartition(".")[0] if "::" not in path else path.split("::")[0]
        while parent not in nodes:  # an ancestor not listed (e.g. depth-limited): attach to the nearest one
            parent = parent.rpartition(".")[0]
        nodes[path] = nodes[parent].add(label)
    _out.print(root)

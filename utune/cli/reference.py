"""The CLI reference (``docs/cli.md``), generated from the Typer app itself so it cannot drift.

``python -m utune.cli.reference > docs/cli.md`` regenerates it; ``tests/test_docs.py`` checks the file is
what this prints. Each command: its usage, its help text, and a table of its arguments and options with
their defaults. Read from the command objects (no Rich rendering): the text is the same on every terminal.
Typer ships its own click, so the objects are duck-typed (``list_commands`` means a group).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer

HEADER = """# CLI reference

Generated from the Typer app by `python -m utune.cli.reference > docs/cli.md` (a test checks it is current).
Each command is a thin layer over one library call: see
[architecture.md](architecture.md#commands-and-the-library-calls-under-them).
"""


def _commands(group: Any, prefix: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    ctx = group.context_class(group)
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        path = f"{prefix} {name}"
        if hasattr(cmd, "list_commands"):
            found += _commands(cmd, path)
        else:
            found.append((path, cmd))
    return found


def _is_argument(param: Any) -> bool:
    return bool(param.param_type_name == "argument")


def _default(param: Any) -> str:
    if not _is_argument(param) and (param.is_flag or param.count):
        return ""
    value = param.default
    if value is None or callable(value) or value == ():
        return ""
    return f"`{value}`"


def _row(param: Any) -> str:
    if _is_argument(param):
        name = f"`{(param.metavar or param.name or '').upper()}`" + ("" if param.required else " (optional)")
        help_text = getattr(param, "help", None) or ""
    else:
        name = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        help_text = getattr(param, "help", None) or ""
    text = " ".join(help_text.split()).replace("|", "\\|")
    return f"| {name} | {text} | {_default(param)} |"


def _section(path: str, cmd: Any) -> str:
    ctx = cmd.context_class(cmd, info_name=path)
    usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(cmd.collect_usage_pieces(ctx)))
    lines = [f"## `{path}`", "", f"```text\n{path} {usage}\n```", ""]
    if cmd.help:
        lines += [cmd.help.strip(), ""]
    params = [p for p in cmd.params if _is_argument(p) or "--help" not in p.opts]
    if params:
        lines += ["| argument / option | what | default |", "|---|---|---|", *(_row(p) for p in params), ""]
    return "\n".join(lines)


def cli_reference() -> str:
    """The markdown reference of every ``utune`` command."""
    from utune.cli import app

    root = typer.main.get_command(app)
    sections = [_section(path, cmd) for path, cmd in _commands(root, "utune")]
    return HEADER + "\n" + "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(cli_reference())

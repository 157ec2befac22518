"""What every command shares: the option vocabulary, the output format switch, and argument helpers.

Nothing here imports torch: ``utune --help`` and typos in a command line answer in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from utune import _output as out
from utune.errors import UserInputError

FORMATS = ("table", "json")

Format = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="table (for people) or json (one JSON document on stdout; progress and notes on stderr)",
    ),
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key.path=value overrides of the spec, e.g. train.lr=1e-3 tuners.0.dim=16")
]
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="which checkpoint of the run: latest | best")]
Download = Annotated[
    bool,
    typer.Option("--download", help="fetch a missing dataset from its official source (CIFAR, Fashion-MNIST, Flowers)"),
]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="where the dataset lives (sets data.root)")]
Dataset = Annotated[str | None, typer.Option("--dataset", help="the dataset (sets data.dataset), e.g. cifar100")]


def set_format(fmt: str, allowed: tuple[str, ...] = FORMATS, *, artifact_hint: str | None = None) -> str:
    """Validate ``--format`` and switch the output into JSON mode when asked."""
    if fmt not in allowed:
        hint = f"use one of: {', '.join(allowed)}"
        if artifact_hint:
            hint += f"; {artifact_hint}"
        raise UserInputError(f"unknown --format {fmt!r}", hint=hint)
    out.set_json(fmt == "json")
    return fmt


def split_overrides(first: str | None, rest: list[str] | None) -> tuple[str | None, list[str]]:
    """``utune eval key=value`` means no run argument and an override (when no such path exists)."""
    ov = list(rest or [])
    if first is not None and "=" in first and not Path(first).exists():
        return None, [first, *ov]
    return first, ov


def data_overrides(dataset: str | None, data_dir: Path | None) -> list[str]:
    ov = []
    if dataset:
        ov.append(f"data.dataset={dataset}")
    if data_dir is not None:
        ov.append(f"data.root={data_dir.expanduser().resolve()}")
    return ov


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UserInputError(f"unknown {name} {value!r}", hint=f"use one of: {', '.join(allowed)}")
    return value


def spec_file(arg: str | Path) -> Path:
    """A spec argument: an existing file (it wins), else a built-in spec's name (``utune specs``); which one
    was used is said on stderr when a built-in was involved. The one place the CLI resolves spec names."""
    from utune.spec.catalog import resolve

    resolved = resolve(arg)
    line = resolved.describe()
    if line:
        out.note(line)
    return resolved.path

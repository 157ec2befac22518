"""Grids of hyper-parameter values for ``utune compare``: ``train.lr=1e-3,3e-3`` or relative ``0.3x,1x,3x``."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from utune.errors import UserInputError

_RELATIVE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*x\s*$")
Grid = dict[str, list[str]]


def parse_values(text: str, key: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]`` (each a YAML value, or ``<factor>x``: times the spec's own value)."""
    values = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in values):
        raise UserInputError(f"empty value in the grid for {key}: {text!r}", hint=f"write e.g. {key}=1e-3,3e-3,1e-2")
    if len(set(values)) != len(values):
        raise UserInputError(f"the grid for {key} repeats a value: {text!r}", hint="list each value once")
    return values


def parse_grid(items: Sequence[str] = (), lr_grid: str | None = None) -> Grid:
    """``--grid key=a,b`` items and ``--lr-grid a,b`` (= ``--grid train.lr=a,b``) as ``{key: [values]}``."""
    grid: Grid = {}
    pairs = [*items, *([f"train.lr={lr_grid}"] if lr_grid is not None else [])]
    for item in pairs:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserInputError(
                f"bad --grid {item!r}", hint="write --grid key.path=a,b,c, e.g. --grid train.lr=1e-3,1e-2"
            )
        if key in grid:
            raise UserInputError(f"the grid names {key} twice", hint="give each key one list of values")
        grid[key] = parse_values(text, key)
    return grid


def _lookup(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
    return node


def _typed(value: str) -> Any:
    """A grid value as YAML reads it, with ``1e-3`` a number (YAML 1.1 reads it as text)."""
    import yaml

    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def resolve(grid: Grid, spec_dict: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each value as the number or YAML text it stands for; ``<f>x`` is ``f`` times the spec's own value."""
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        resolved: list[Any] = []
        for value in values:
            match = _RELATIVE.match(value)
            if match is None:
                resolved.append(_typed(value))
                continue
            base = _lookup(spec_dict, key)
            if not isinstance(base, (int, float)) or isinstance(base, bool):
                raise UserInputError(
                    f"grid value {value!r} is relative, but {key} is {base!r} in the spec, not a number",
                    hint=f"give absolute values for {key}",
                )
            resolved.append(float(f"{float(match.group(1)) * base:.6g}"))
        out[key] = resolved
    return out


def assignments(values: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's points in order (the first key varies slowest); one empty point for an empty grid."""
    keys = list(values)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values[k] for k in keys))]


def as_overrides(point: Mapping[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in point.items()]


def label(point: Mapping[str, Any]) -> str:
    """``lr=0.001,dim=8`` for folder names and tables: the last segment of each key."""
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()) or "spec"

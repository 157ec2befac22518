"""The tuner registry: defining a tuner kind registers it; nothing else names it."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from utune.errors import SpecError

if TYPE_CHECKING:
    from utune.tuners.base import TunerKind

_KINDS: dict[str, type[TunerKind]] = {}


def register(cls: type[TunerKind]) -> type[TunerKind]:
    """Class decorator: add a tuner kind to the registry (duplicates are a programming error)."""
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise RuntimeError(f"tuner kind {cls.kind!r} registered twice ({_KINDS[cls.kind]} and {cls})")
    _KINDS[cls.kind] = cls
    return cls


def kinds() -> dict[str, type[TunerKind]]:
    """All registered kinds, importing the built-in ones first."""
    import utune.tuners  # noqa: F401  (registers the built-in kinds)

    return dict(sorted(_KINDS.items()))


def get_kind(name: str) -> type[TunerKind]:
    all_kinds = kinds()
    if name not in all_kinds:
        close = difflib.get_close_matches(name, list(all_kinds), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known kinds: {', '.join(all_kinds)}"
        raise SpecError(f"unknown tuner kind {name!r}", hint=hint + " (`utune tuners` lists them)")
    return all_kinds[name]


def _option_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """The JSON-schema facts of one option a user needs (type, allowed values, bounds), titles dropped."""
    keep = ("type", "enum", "anyOf", "items", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "const")
    out: dict[str, Any] = {}
    for key in keep:
        if key in prop:
            value = prop[key]
            out[key] = [_option_schema(v) for v in value] if key == "anyOf" else value
    return out


def _identity(cls: type[TunerKind]) -> dict[str, bool]:
    """Whether the tuned model equals the base at init, per placement (prefix/prompt: parallel only)."""
    out = {}
    for placement in cls.placements:
        probe = cls.__new__(cls)  # identity_at_init may be a property of the placement; no rule needed
        probe.placement = placement
        out[placement] = bool(probe.identity_at_init)
    return out


def describe_kinds() -> list[dict[str, Any]]:
    """Every kind as plain data: placements, flags, and each option's default, schema and meaning."""
    rows = []
    for name, cls in kinds().items():
        schema = cls.Options.model_json_schema()
        props = schema.get("properties", {})
        options = {
            key: {
                "default": field.default,
                "description": field.description or "",
                "schema": _option_schema(props.get(key, {})),
                "runtime_only": key in getattr(cls.Options, "runtime_only", ()),
            }
            for key, field in cls.Options.model_fields.items()
        }
        rows.append(
            {
                "kind": name,
                "summary": cls.summary,
                "placements": list(cls.placements),
                "default_placement": cls.default_placement,
                "identity_at_init": _identity(cls),
                "mergeable": cls.mergeable,
                "options": options,
            }
        )
    return rows


def kinds_markdown(rows: list[dict[str, Any]] | None = None) -> str:
    """The README's kinds table, generated from the registry (a test keeps the README equal to it)."""
    rows = describe_kinds() if rows is None else rows
    head = "| kind | placements | what it is | options (defaults) | identity at init | merges |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"`{k}={_md_value(o['default'])}`" for k, o in r["options"].items()) or "-"
        ident = r["identity_at_init"]
        if all(ident.values()) or not any(ident.values()):
            shown = "yes" if all(ident.values()) else "no"
        else:
            shown = "; ".join(f"{p}: {'yes' if v else 'no'}" for p, v in ident.items())
        merges = "yes" if r["mergeable"] else "no"
        lines.append(f"| `{r['kind']}` | {', '.join(r['placements'])} | {r['summary']} | {opts} | {shown} | {merges} |")
    return "\n".join(lines) + "\n"


def _md_value(value: Any) -> str:
    return "null" if value is None else str(value)


README_START, README_END = "<!-- tuners-table:start -->\n", "<!-- tuners-table:end -->"


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the kinds table between the README's markers from the registry (``make docs``); True if changed."""
    from pathlib import Path

    file = Path(path)
    text = file.read_text()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_START + kinds_markdown() + README_END + tail
    if new != text:
        file.write_text(new)
    return new != text

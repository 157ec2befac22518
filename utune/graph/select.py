"""Selectors: which sites a rule's ``at:`` picks.

``at:`` is a glob (``blocks.*.attn.qkv``), a list of globs, or a mapping::

    at: {path: "blocks.*", type: Linear, op: scaled_dot_product_attention, layers: "0-5", exclude: ["**.head"]}

``*`` matches one path segment, ``**`` any number. ``type`` matches module classes (subclasses
included) or functional op names. ``op`` picks functional calls *inside* the modules ``path``
matches. ``layers`` keeps sites whose first integer segment (``blocks.3`` -> 3) is in the range.
A glob without ``::`` matches module sites only; write ``::op`` in the glob to match functional calls.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import field_validator, model_validator

from utune._schema import Section
from utune.errors import SelectionError
from utune.graph.glob import glob_match
from utune.graph.sites import Site


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def parse_layers(v: Any) -> list[int] | None:
    """``"0-5"``, ``"0,2,4-7"``, ``3`` or ``[0, 1]`` -> a sorted list of layer indices."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError("layers must be an integer, a list of integers or a range string like '0-5'")
    if isinstance(v, int):
        v = [v]
    if isinstance(v, str):
        out: list[int] = []
        for part in v.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"layers {v!r}: expected ranges like '0-5' or '0,2,4-7'")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise ValueError(f"layers {v!r}: range {lo}-{hi} is empty (the end is before the start)")
            out.extend(range(lo, hi + 1))
        v = out
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        raise ValueError("layers must be non-negative integers")
    return sorted(set(v))


class Selector(Section):
    """The ``at:`` of a rule."""

    path: list[str] = ["**"]
    type: list[str] = []
    op: list[str] = []
    layers: list[int] | None = None
    exclude: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, v: Any) -> Any:
        if isinstance(v, str | list):
            return {"path": v}
        return v

    @field_validator("path", "type", "op", "exclude", mode="before")
    @classmethod
    def _str_to_list(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("path globs must be non-empty strings")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> list[int] | None:
        return parse_layers(v)

    def describe(self) -> str:
        parts = [f"path={'|'.join(self.path)}"]
        if self.type:
            parts.append(f"type={'|'.join(self.type)}")
        if self.op:
            parts.append(f"op={'|'.join(self.op)}")
        if self.layers is not None:
            parts.append(f"layers={self.layers}")
        if self.exclude:
            parts.append(f"exclude={'|'.join(self.exclude)}")
        return ", ".join(parts)


@dataclass
class Selection:
    sites: list[Site]
    uncalled: list[Site] = field(default_factory=list)  # matched layers a tuner cannot attach to
    warnings: list[str] = field(default_factory=list)


_INT = re.compile(r"^\d+$")


def layer_index(path: str) -> int | None:
    for seg in path.split("::")[0].split("."):
        if _INT.match(seg):
            return int(seg)
    return None


def _path_matches(sel: Selector, site: Site) -> bool:
    if sel.op:
        if site.op not in ("function", "method"):
            return False
        encl = site.enclosing
        inside = any(glob_match(g, encl) or glob_match(g + ".**", encl) for g in sel.path)
        return inside and any(glob_match(o, site.type) or glob_match(o, site.path.split("::")[1]) for o in sel.op)
    functional = site.op in ("function", "method")
    return any(("::" in g) == functional and glob_match(g, site.path) for g in sel.path)


def _type_matches(sel: Selector, site: Site) -> bool:
    return not sel.type or bool(set(sel.type) & site.mro_names())


def select(sites: dict[str, Site], sel: Selector, rule: str = "") -> Selection:
    """Sites ``sel`` picks, in graph order; SelectionError with the closest names when none.

    Every path glob of the selector must pick at least one site (a glob of a list that matches nothing is
    an error naming the closest sites, not silently dropped); an ``exclude`` glob that removes nothing and
    ``layers`` that do not exist are warnings.
    """
    typed = [s for s in sites.values() if _type_matches(sel, s)]
    warnings: list[str] = []
    if len(sel.path) > 1:
        for glob in sel.path:
            one = sel.model_copy(update={"path": [glob]})
            if not any(_path_matches(one, s) for s in typed):
                raise _no_match(sites, one, rule, [], part_of=sel)
    hit = [s for s in typed if _path_matches(sel, s)]
    if sel.layers is not None:
        present = {i for s in hit if (i := layer_index(s.path)) is not None}
        wanted = set(sel.layers)
        if wanted - present and hit:
            warnings.append(_layers_warning(rule, wanted - present, present))
        hit = [s for s in hit if layer_index(s.path) in wanted]
    for g in sel.exclude:
        before = len(hit)
        hit = [s for s in hit if not (glob_match(g, s.path) or glob_match(g + ".**", s.path))]
        if len(hit) == before:
            close = _closest(sites, [g])
            near = f" (closest sites: {', '.join(close[:3])})" if close else ""
            warnings.append(f"rule {rule!r}: exclude {g!r} removed nothing{near}")
    uncalled = [s for s in hit if s.op == "uncalled"]
    good = [s for s in hit if s.op != "uncalled"]
    if not good:
        raise _no_match(sites, sel, rule, uncalled)
    if uncalled:
        warnings.append(
            f"rule {rule!r}: {len(uncalled)} matched layer(s) cannot take a tuner and were left out, e.g. "
            f"{uncalled[0].path}: {uncalled[0].reason}"
        )
    return Selection(good, uncalled, warnings)


def _layers_warning(rule: str, missing: set[int], present: set[int]) -> str:
    have = f"{min(present)}-{max(present)}" if present else "none"
    return (
        f"rule {rule!r}: layers {_ranges(sorted(missing))} do not exist among the matched sites "
        f"(they have layers {have})"
    )


def _ranges(values: list[int]) -> str:
    out: list[str] = []
    for v in values:
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ",".join(out)


def _closest(sites: dict[str, Site], globs: list[str]) -> list[str]:
    names = [p for p, s in sites.items() if s.op != "uncalled"]
    close: list[str] = []
    for g in globs:
        probe = g.replace("**", "0").replace("*", "0")
        close += [c for c in difflib.get_close_matches(probe, names, n=3, cutoff=0.5) if c not in close]
    return close


def _no_match(
    sites: dict[str, Site], sel: Selector, rule: str, uncalled: list[Site], part_of: Selector | None = None
) -> SelectionError:
    who = f"rule {rule!r}" if rule else "selector"
    if uncalled:
        s = uncalled[0]
        return SelectionError(
            f"{who} matches only {s.type} layers that are never called as modules, e.g. {s.path}: {s.reason}",
            hint=f"attach the tuner to the enclosing module ({s.path.rpartition('.')[0]}) or pick another site",
        )
    close = _closest(sites, sel.path)
    extra = []
    if sel.type:
        types = sorted({s.type for s in sites.values()})
        tclose = [t for x in sel.type for t in difflib.get_close_matches(x, types, n=2)]
        extra.append(f"types here include {', '.join(tclose or types[:6])}")
    hint = f"closest sites: {', '.join(close[:5])}" if close else "no site path is close"
    if extra:
        hint += "; " + "; ".join(extra)
    what = f"({sel.describe()}) matches no site"
    if part_of is not None:
        what = f"glob {sel.path[0]!r} of its `at:` list ({part_of.describe()}) matches no site"
    return SelectionError(f"{who} {what}", hint=hint + " (`utune inspect MODEL --grep GLOB` lists sites)")

"""The tuner registry: defining a tuner kind registers it; nothing else names it."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

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

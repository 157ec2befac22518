"""Which tuner module sits at which site, read from the build's manifest, and refusals listed per rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from utune.errors import ExportError, UtuneError
from utune.graph.manifest import Entry

if TYPE_CHECKING:
    from utune.engine.record import Built

TunerSite = Entry  # one tuner module of the manifest: rule, kind, site, module name, join, inputs


def tuner_sites(built: Built) -> list[Entry]:
    """Every tuner module of ``built`` (manifest entries with a module), in the order they were attached."""
    return built.manifest.tuners()


def tuner_module(built: Built, ts: Entry) -> nn.Module:
    return built.model.get_submodule(ts.module)


def refusal(title: str, refused: list[tuple[Entry, str]], hint: str, cls: type[UtuneError] = ExportError) -> UtuneError:
    """One error listing every refused rule (name and kind) with its first site and reason."""
    by_rule: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for ts, why in refused:
        by_rule.setdefault((ts.rule, ts.kind), []).append((ts.site, why))
    lines = []
    for (rule, kind), items in by_rule.items():
        site, why = items[0]
        more = f" (and {len(items) - 1} more site(s))" if len(items) > 1 else ""
        lines.append(f"  - {rule} ({kind}) at {site}{more}: {why}")
    names = ", ".join(f"{r} ({k})" for r, k in by_rule)
    return cls(f"{title}: {names}\n" + "\n".join(lines), hint=hint)

"""Which tuner module sits at which site: ``utune.<rule_key>.<site_key>`` <-> ``(rule, site path)``.

The rewrite names each tuner module after its rule and site (:func:`utune.graph.rewrite.module_key`);
the report lists every rule's sites in the order they were attached. Both together give the mapping
without parsing names back (``module_key`` is not invertible: ``blocks.0`` and ``blocks_0`` collide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from utune.errors import ExportError, UtuneError
from utune.graph.rewrite import TUNER_ROOT, module_key


@dataclass(frozen=True)
class TunerSite:
    rule: str  # the spec rule's name
    kind: str  # its tuner kind
    site: str  # the site path (as `utune inspect` prints it)
    module: str  # the tuner module's name in the GraphModule

    @property
    def key(self) -> str:
        """The site-name form used in tuner-only files: ``<rule>/<site>``."""
        return f"{self.rule}/{self.site}"


def tuner_sites(built: Any) -> list[TunerSite]:
    """Every tuner module of ``built`` with its rule, kind and site, in spec (= insertion) order."""
    out: list[TunerSite] = []
    seen: set[str] = set()
    for rule in built.report["tuners"]:
        name, kind = rule["name"], rule["kind"]
        by_module = {f"{TUNER_ROOT}.{module_key(name)}.{module_key(s)}": s for s in rule["sites"]}
        for module in built.tuner_modules.get(name, []):
            site = by_module.get(module)
            if site is None or module in seen:
                raise ExportError(
                    f"rule {name!r}: cannot tell which site tuner module {module} belongs to",
                    hint="two sites may map to the same module name; report this with the spec",
                )
            seen.add(module)
            out.append(TunerSite(name, kind, site, module))
    return out


def tuner_module(built: Any, ts: TunerSite) -> nn.Module:
    return built.model.get_submodule(ts.module)


def refusal(
    title: str, refused: list[tuple[TunerSite, str]], hint: str, cls: type[UtuneError] = ExportError
) -> UtuneError:
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

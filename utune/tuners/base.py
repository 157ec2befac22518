"""What every tuner kind is: options, what it accepts, the modules it builds, and how it plans to attach.

A kind subclasses :class:`TunerKind`, sets ``kind`` and ``Options``, and is registered with ``@register``
in its own file under ``utune/tuners/`` (importing the package registers every file there); a kind in the
user's code is the same class, found by import path or entry point (:mod:`utune.kinds` is its public API). It *plans*:
:meth:`TunerKind.plan` returns :class:`~utune.graph.manifest.Attachment` values (module, site, tap, join)
and the one rewriter applies them; no kind touches a graph node. The default plan is the U-Tuning
mechanism, ``x' = OP(x) + U(tap)``: tap = the site's input (parallel) or output (sequential), join = add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from utune._schema import Section
from utune.errors import SelectionError
from utune.graph.manifest import Attachment, Tap, Where

if TYPE_CHECKING:
    from utune.graph.context import PlanContext
    from utune.graph.sites import Site


class TunerOptions(Section):
    """The kind's own keys in a rule (``dim``, ``rank``...). Subclasses add fields with defaults and a
    ``description`` each (``utune tuners`` and the JSON schema show it).

    ``runtime_only`` names options that change no weight (dropout): a tuner file trained with other
    values of them still loads.
    """

    runtime_only: ClassVar[tuple[str, ...]] = ()


class TunerKind:
    """One kind of tuner. Class attributes are its declaration; :meth:`plan` is its behaviour."""

    kind: ClassVar[str]
    Options: ClassVar[type[TunerOptions]] = TunerOptions
    summary: ClassVar[str] = ""  # one line: the math and the paper
    placements: ClassVar[tuple[str, ...]] = ("parallel", "sequential")
    default_placement: ClassVar[str] = "parallel"
    # placement -> the `tap:` values a rule may set (the first is the default); () = the rule takes no tap
    taps: ClassVar[dict[str, tuple[Where, ...]]] = {
        "parallel": ("input", "output", "parent.input", "parent.output"),
        "sequential": ("output", "input", "parent.input", "parent.output"),
    }
    identity_at_init: ClassVar[bool] = True  # tuned == base at init
    identity_atol: ClassVar[float] = 0.0  # the tolerance of that claim (0 = bit-exact)
    mergeable: ClassVar[bool] = False  # folds into the base weights (export --merge)

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.options: Any = rule.options
        self.placement: str = rule.placement or self.default_placement
        if self.placement not in self.placements:
            raise SelectionError(
                f"rule {rule.name!r}: kind {self.kind} has no placement {self.placement!r}",
                hint=f"use one of: {', '.join(self.placements)}",
            )

    @property
    def where(self) -> Where:
        """The tap the rule reads: its ``tap:`` or the placement's default."""
        allowed = self.taps.get(self.placement, ())
        return self.rule.tap or (allowed[0] if allowed else "input")

    # ----- per kind -----
    def check(self, site: Site, ctx: PlanContext) -> None:
        """Raise SelectionError when this kind cannot serve ``site`` (before anything is attached)."""

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        raise NotImplementedError(f"kind {self.kind} plans without build(); it overrides plan()")

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        """The attachments for one site (the default: ``out + U(tap)``)."""
        return [Attachment(site, self.build(site, ctx), "add", (Tap(self.where),))]

    def plan_selection(self, sites: list[Site], ctx: PlanContext) -> list[Attachment] | None:
        """The whole rule's attachments at once, for kinds that need every site (tokens carried across
        blocks, a side network); None: plan site by site (each site sees the ones before it applied)."""
        return None

    # ----- helpers -----
    def fail(self, site: Site, why: str, hint: str | None = None) -> SelectionError:
        return SelectionError(f"rule {self.rule.name!r}: {self.kind} cannot attach to {site.path}: {why}", hint=hint)


def is_fused_qkv(site: Site) -> bool:
    """A fused q/k/v projection: a Linear named like ``qkv`` (or a packed MHA ``in_proj``, which says it is
    one) whose output is three times its input."""
    mod = site.module
    leaf = site.path.rpartition(".")[2].lower()
    fused = "qkv" in leaf or getattr(mod, "fused_qkv", False) is True
    return isinstance(mod, nn.Linear) and mod.out_features == 3 * mod.in_features and fused

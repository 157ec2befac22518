"""What a tuner kind may ask about the model while it plans: shapes, layouts, sites, attention facts.

Kinds never see an fx node: they get :class:`~utune.graph.sites.Site` values (path, op, type, module) and
ask this context for the rest. Shapes are those of the graph as rewritten so far, so a rule planned after
another (prompt tokens, say) sees the token counts the first one made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import fx, nn

from utune.errors import SelectionError
from utune.graph.attention import Projections, find_attention, find_projections
from utune.graph.layout import channel_dim, input_channel_dim
from utune.graph.manifest import Tap, Where
from utune.graph.sites import Site

if TYPE_CHECKING:
    from utune.graph.rewrite import Rewriter


class PlanContext:
    """The rewriter's view of the model, read-only, for :meth:`utune.tuners.base.TunerKind.plan`."""

    def __init__(self, rw: Rewriter) -> None:
        self._rw = rw

    @property
    def root(self) -> nn.Module:
        """The base model (its modules and attributes: ``num_prefix_tokens``, ``cls_token``...)."""
        return self._rw.root

    @property
    def sites(self) -> Mapping[str, Site]:
        return self._rw.sites

    def site(self, path: str) -> Site | None:
        return self._rw.sites.get(path)

    def shape(self, site: Site, tap: Tap) -> tuple[int, ...] | None:
        """The current shape of the value ``tap`` names (before its ``through`` layers)."""
        target = self._rw.sites[tap.site] if tap.site else site
        return self._rw.shape(self._rw.tap(target, tap.where))

    def output_shape(self, site: Site) -> tuple[int, ...] | None:
        return self._rw.shape(self._rw.output(site))

    def channel_dim(self, site: Site, shape: tuple[int, ...], override: int | None = None) -> int:
        """Which dim of ``site``'s output (of ``shape``) holds channels: -1 (last) or 1 (first), decided from
        the layers that make and read it (:mod:`utune.graph.layout`); ``override`` is the rule's ``channel_dim``."""
        return channel_dim(site, shape, override, self._rw.output(site))

    def tap_channel_dim(self, site: Site, tap: Tap) -> int | None:
        """The channel dim of the value ``tap`` reads (before its ``through`` layers), or None when the layers
        around it do not tell."""
        target, where = self._rw.tapped_site(self._rw.sites[tap.site] if tap.site else site, tap.where)
        node = self._rw.tap(target, where)
        shape = self._rw.shape(node)
        if shape is None:
            return None
        try:
            return channel_dim(target, shape, None, node)
        except SelectionError:
            return None

    def input_channel_dim(self, site: Site, shape: tuple[int, ...], override: int | None = None) -> int:
        """Which dim of ``site``'s input (of ``shape``) holds channels."""
        return input_channel_dim(site, shape, override)

    def reader(self, site: Site) -> Site | None:
        """The first module site (outside ``site``) whose input is ``site``'s output, e.g. the norm after
        the last block."""
        out = site.output  # as traced: earlier rules may have joined something onto it since
        for s in self._rw.sites.values():
            if s.op in ("module", "composite") and s.input is out and not s.path.startswith(site.path):
                return s
        return None

    def attention(self, site: Site) -> tuple[int, int] | str:
        """``(heads, head_dim)`` of the attention computed inside ``site``, or why there is none."""
        found = find_attention(site)
        if isinstance(found, str):
            return found
        shape = self._rw.shape(self._rw.current(found.k))
        if shape is None or len(shape) != 4:
            return f"its keys are not (B, heads, N, d) (shape {shape})"
        return shape[1], shape[3]

    def projections(self, path: str) -> Projections | None:
        """The attention projections (q/k/v layer paths) at or under ``path`` or its parent block."""
        return find_projections(self._rw.root, path)

    def query_tap(self, proj: Projections, site: Site, where: Where) -> Tap:
        """The tap that gives the frozen query of what ``site`` reads at ``where``: through the block's
        pre-attention norm when ``where`` is what that norm reads (a Block's input), then the query layer."""
        norm = self._pre_norm(proj.q, site, where)
        return Tap(where, through=(*((norm,) if norm else ()), proj.q))

    def _pre_norm(self, q_path: str, site: Site, where: Where) -> str | None:
        q_site = self._rw.sites.get(q_path)
        q_in = q_site.input if q_site is not None else None
        if q_in is None or q_in.op != "call_module":
            return None
        norm = self._rw.gm.get_submodule(str(q_in.target))
        tapped = self._rw.tap(site, where)
        reads_tap = bool(q_in.args) and isinstance(q_in.args[0], fx.Node) and q_in.args[0] is tapped
        return str(q_in.target) if isinstance(norm, nn.LayerNorm | nn.GroupNorm) and reads_tap else None

    def fail(self, rule: str, kind: str, site: Site, why: str, hint: str | None = None) -> SelectionError:
        return SelectionError(f"rule {rule!r}: {kind} cannot attach to {site.path}: {why}", hint=hint)

"""Res-Tuning-Bypass: a side network beside a frozen backbone that needs no backward pass through it.

Jiang et al. 2023 (Res-Tuning, NeurIPS). Seeded by the (detached) input of the first selected site,
for each selected site ``l`` (e.g. every block)::

    b_l = A_lat(x_l) + A_ver(b_{l-1}),   x_l = detach(output of site l),   A(x) = x + W_up·GELU(W_down·x)

and the last ``b`` replaces the input of the ``into`` site (by default the op that reads the last
selected site's output: the final norm before a ViT's head, the global pool of a CNN). The backbone's
parameters are frozen and its input needs no gradient, so autograd records none of its operations:
no stored activations, no backward pass through it. When stage widths or resolutions differ (CNN
stages), the vertical adapter's residual is a 1x1 projection (and an average pool by the stage's
downsampling factor), so ``A_ver`` maps ``b_{l-1}`` to stage ``l``'s shape. Not the identity at init.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Ref, Tap, Value
from utune.graph.sites import Site
from utune.tuners.adapter import Adapter, AdapterOptions, _pool_factor
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.modules import channel_linear
from utune.tuners.registry import register


class BypassOptions(TunerOptions):
    dim: int = Field(
        default=10, gt=0, description="bottleneck L of every lateral and vertical adapter (10 in the paper)"
    )
    into: str | None = Field(
        default=None,
        description="site whose input the side network's output replaces; null: the op reading the last site's output",
    )
    seed: str | None = Field(
        default=None, description="site whose (detached) input seeds the side network; null: the first selected site"
    )
    checkpoint: bool = Field(
        default=False,
        description="recompute each side step's adapters in backward (torch.utils.checkpoint): keeps only the "
        "step's inputs, the block output as the backbone gave it (bf16 with model.frozen_dtype: bfloat16)",
    )


class ResAdapter(nn.Module):
    """``A(x) = P(x) + W_up·GELU(W_down·x)``: P is the identity, or a 1x1 projection/pool across stages."""

    def __init__(self, c_in: int, c_out: int, dim: int, channel_dim: int, pool: int = 1) -> None:
        super().__init__()
        self.channel_dim, self.pool = channel_dim, pool
        self.adapter = Adapter(c_in, c_out, AdapterOptions(dim=dim, scale="none"), channel_dim, pool)
        self.proj = nn.Linear(c_in, c_out) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.adapter(x)
        if self.pool > 1:
            d = self.channel_dim
            x = (
                nn.functional.avg_pool2d(x, self.pool)
                if d == 1
                else nn.functional.avg_pool2d(x.movedim(-1, 1), self.pool).movedim(1, -1)
            )
        if self.proj is not None:
            x = channel_linear(x, self.proj, self.channel_dim)
        return x + delta


class SideStep(nn.Module):
    """One stage of the side network: ``b_l = A_lat(x_l) + A_ver(b_{l-1})``. It computes in its own dtype
    (float32) whatever dtype the backbone hands it (``reads_low_precision``: a bf16 backbone's block output
    is kept as it is for backward, cast inside)."""

    reads_low_precision = True

    def __init__(self, lateral: ResAdapter, vertical: ResAdapter, checkpoint: bool = False) -> None:
        super().__init__()
        self.lateral, self.vertical = lateral, vertical
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.step, x, b, use_reentrant=False)
        return self.step(x, b)

    def step(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = self.lateral.adapter.down.weight.dtype
        return self.lateral(x.to(dtype)) + self.vertical(b.to(dtype))


@register
class BypassKind(TunerKind):
    kind = "bypass"
    Options = BypassOptions
    summary = "b_l = A_lat(detach x_l) + A_ver(b_{l-1}); last b feeds the head (Res-Tuning-Bypass, Jiang et al. 2023)"
    placements = ("parallel",)
    taps = {"parallel": ()}  # it reads every selected site's output (and the seed's input): no tap key
    identity_at_init = False

    def check(self, site: Site, ctx: PlanContext) -> None:
        if site.n_outputs != 1:
            raise self.fail(site, f"it has {site.n_outputs} outputs; the bypass reads one per stage")

    def _site(self, ctx: PlanContext, path: str, what: str, near: Site) -> Site:
        found = ctx.site(path)
        if found is None:
            import difflib

            close = difflib.get_close_matches(path, list(ctx.sites), n=3)
            raise self.fail(
                near, f"{what} site {path!r} does not exist", hint=f"closest: {', '.join(close)}" if close else None
            )
        return found

    def _into(self, ctx: PlanContext, last: Site) -> Site:
        if self.options.into:
            return self._site(ctx, self.options.into, "`into`", last)
        reader = ctx.reader(last)
        if reader is None:
            raise self.fail(last, "no op reads its output; set `into:` to the site the side network should feed")
        return reader

    def plan_selection(self, sites: list[Site], ctx: PlanContext) -> list[Attachment] | None:
        """One side step per site, seeded by the detached input of the first, feeding ``into``'s input."""
        opts: BypassOptions = self.options
        seed = self._site(ctx, opts.seed, "`seed`", sites[0]) if opts.seed else sites[0]
        into = self._into(ctx, sites[-1])
        b_shape = ctx.shape(seed, Tap("input"))
        b: Value = Tap("input", site=seed.path, detach=True)
        plan: list[Attachment] = []
        for site in sites:
            x_shape = ctx.output_shape(site)
            if x_shape is None or b_shape is None:
                raise self.fail(site, "its output is not a tensor")
            plan.append(Attachment(site, self._step(site, ctx, x_shape, b_shape), "side", (Tap("output"), b)))
            b, b_shape = Ref(len(plan) - 1), x_shape
        inp = ctx.shape(into, Tap("input"))
        if inp is None or b_shape is None or inp != b_shape:
            raise self.fail(into, f"its input {inp} differs from the side state {b_shape}")
        plan.append(Attachment(into, None, "replace_input", (b,)))
        return plan

    def _step(self, site: Site, ctx: PlanContext, x_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> SideStep:
        opts: BypassOptions = self.options
        d = ctx.channel_dim(site, x_shape) if len(x_shape) == 4 else -1
        pool = _pool_factor(_spatial(b_shape, d), _spatial(x_shape, d)) if len(x_shape) == 4 else 1
        if pool is None or (len(x_shape) != 4 and x_shape[1:-1] != b_shape[1:-1]):
            raise self.fail(site, f"the side state {list(b_shape)} cannot be mapped to {list(x_shape)}")
        return SideStep(
            ResAdapter(x_shape[d], x_shape[d], opts.dim, d),
            ResAdapter(b_shape[d], x_shape[d], opts.dim, d, pool),
            opts.checkpoint,
        )


def _spatial(shape: tuple[int, ...], d: int) -> list[int]:
    return [s for i, s in enumerate(shape[1:], 1) if i != d % len(shape)]

"""Per-channel tuners that rescale or shift an op's output; all fold into the layer before them.

- ``bias`` (BitFit, Ben Zaken et al. 2022): ``y = OP(x) + b``, b from zero; merged into the layer's bias.
- ``ssf`` (Lian et al. 2022): ``y = γ ⊙ OP(x) + β``, γ = 1, β = 0 at init; merged into a Linear/Conv/Norm.
- ``ia3`` (Liu et al. 2022): ``y = l ⊙ OP(x)``, l = 1 at init (optionally only some qkv slices).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions, is_fused_qkv
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.modules import channel_view
from utune.tuners.registry import register


class ChannelAffine(nn.Module):
    """``y = scale ⊙ x + shift`` over one channel dim; either part may be absent."""

    def __init__(
        self,
        channels: int,
        dim: int,
        scale: bool,
        shift: bool,
        index: torch.Tensor | None = None,
        init_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.channel_dim = dim
        self.channels = channels
        n_scale = channels if index is None else int(index.numel())
        self.scale = nn.Parameter(torch.ones(n_scale)) if scale else None
        self.shift = nn.Parameter(torch.zeros(channels)) if shift else None
        if init_std > 0:
            with torch.no_grad():
                if self.scale is not None:
                    self.scale.normal_(1.0, init_std)
                if self.shift is not None:
                    self.shift.normal_(0.0, init_std)
        # ia3 with slices: learned scales only at ``index``; the other channels keep a fixed 1
        self.index: torch.Tensor | None
        self.register_buffer("index", index, persistent=False)

    def effective_scale(self) -> torch.Tensor | None:
        if self.scale is None or self.index is None:
            return self.scale
        return self.scale.new_ones(self.channels).index_copy(0, self.index, self.scale)

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``y <- s ⊙ y + t`` on the layer's output channels (its weight rows and bias); on its input
        (a ``replace_input`` join, merged as an ``input_map``): ``W' = W diag(s)``, ``b' = b + W t``."""
        if tap == "input_map":
            layer.scale_shift_inputs(f64(self.effective_scale()), f64(self.shift))
            return
        if tap != "replace":
            raise NotMergeable(f"it adds to {layer.path}'s output instead of rescaling it")
        layer.check_axis(self.channel_dim, "its scale/shift")
        layer.scale_shift(f64(self.effective_scale()), f64(self.shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.effective_scale()
        if s is not None:
            x = x * channel_view(s, x.ndim, self.channel_dim)
        if self.shift is not None:
            x = x + channel_view(self.shift, x.ndim, self.channel_dim)
        return x


class _ChannelOptions(TunerOptions):
    channel_dim: Literal[1, -1] | None = Field(
        default=None, description="channels at dim 1 (NCHW) or -1 (tokens, NHWC); null: decided from the layer"
    )


class SsfOptions(_ChannelOptions):
    init_std: float = Field(
        default=0.0, ge=0, description="0: identity at init; SSF's code draws scale ~ N(1, 0.02), shift ~ N(0, 0.02)"
    )


class Ia3Options(_ChannelOptions):
    slices: list[Literal["q", "k", "v"]] | None = Field(
        default=None, description="fused qkv only: scale only these output thirds (IA3: [k, v]); null: all"
    )


class _ChannelKind(TunerKind):
    placements = ("sequential",)
    default_placement = "sequential"
    # output: y <- s * OP(x) + t; input: OP(s * x + t) (the site reads the rescaled value; PEFT's IA3 on
    # feed-forward layers), folded into the layer's weight columns
    taps = {"sequential": ("output", "input")}
    mergeable = True
    has_scale = True
    has_shift = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        if site.n_outputs != 1:
            raise self.fail(site, f"it has {site.n_outputs} outputs")

    def _channels(self, site: Site, ctx: PlanContext) -> tuple[int, int]:
        on_input = self.where == "input"
        shape = ctx.shape(site, Tap("input")) if on_input else ctx.output_shape(site)
        if shape is None or len(shape) < 2:
            raise self.fail(site, f"its {self.where} is not a tensor with a channel dim")
        override = getattr(self.options, "channel_dim", None)
        dim = ctx.input_channel_dim(site, shape, override) if on_input else ctx.channel_dim(site, shape, override)
        return shape[dim], dim

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        c, dim = self._channels(site, ctx)
        return ChannelAffine(c, dim, self.has_scale, self.has_shift, init_std=getattr(self.options, "init_std", 0.0))

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        module = self.build(site, ctx)
        if self.where == "input":
            return [Attachment(site, module, "replace_input", (Tap("input"),))]
        return [Attachment(site, module, "replace", (Tap("output"),))]


@register
class BiasKind(_ChannelKind):
    kind = "bias"
    Options = _ChannelOptions
    summary = "y = OP(x) + b (BitFit as a tuner); Ben Zaken et al. 2022"
    has_scale = False


@register
class SsfKind(_ChannelKind):
    kind = "ssf"
    Options = SsfOptions
    summary = "y = gamma * OP(x) + beta; Lian et al. 2022 (SSF)"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """Only ``init_std: 0`` starts as the base model (SSF's code draws N(1, 0.02), N(0, 0.02)); the
        registry's probe has no rule: the default, 0."""
        opts = getattr(self, "options", None)
        return opts is None or opts.init_std == 0


@register
class Ia3Kind(_ChannelKind):
    kind = "ia3"
    Options = Ia3Options
    summary = "y = l * OP(x); Liu et al. 2022 (IA3)"
    has_shift = False

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        c, dim = self._channels(site, ctx)
        index = None
        if self.options.slices and self.where == "input":
            raise self.fail(site, "`slices` pick output thirds of a fused qkv; they do not go with tap: input")
        if self.options.slices:
            if not is_fused_qkv(site):
                raise self.fail(
                    site,
                    "`slices` need a fused qkv Linear (named *qkv*, out = 3 x in)",
                    hint="drop `slices` for this rule",
                )
            part = c // 3
            index = torch.cat(
                [
                    torch.arange(i * part, (i + 1) * part)
                    for i, s in enumerate(("q", "k", "v"))
                    if s in self.options.slices
                ]
            )
        return ChannelAffine(c, dim, True, False, index=index)

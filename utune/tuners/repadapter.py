"""RepAdapter: ``x <- x + s · B(dropout(A x))`` on what a projection reads, folded into it afterwards.

Luo et al. 2023, "Towards Efficient Visual Adaption via Structural Re-parameterization" (arXiv 2302.08106).
A sequential, *linear* adapter before a layer (ViT: the qkv and fc1 projections, i.e. after norm1 and norm2,
"before MHA and MLP"): ``A`` is a dense ``C -> r`` map with bias, ``B`` a group-wise ``r -> C`` map with bias
(``groups`` blocks: the paper's dense-sparse design, 2 groups), ``s`` a fixed scale (searched per task in the
paper). ``B`` starts at zero, so the model starts as the base. Because it is linear and the layer alone reads
it, it re-parameterises into that layer: ``W' = W (I + s B A)``, ``b' = b + s W (B b_A + b_B)``, and
``export --merge`` writes the plain model (zero inference cost). The dropout between ``A`` and ``B`` (0.1 in the
official code) is training noise only. Any Linear or Conv site works (ConvNeXt's ``mlp.fc1``, a ResNet's 1x1
convs); a composite site (``blocks.0.attn``) also takes it, but then nothing folds it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.registry import register


class RepAdapterOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout",)

    dim: int = Field(default=8, gt=0, description="r: the hidden width of A (8 in the paper)")
    groups: int = Field(default=2, gt=0, description="blocks of the group-wise B (2 in the paper); 1: dense")
    scale: float = Field(default=1.0, description="s: a fixed scale of the adapter's output (searched per task)")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout between A and B in training (0.1)")
    bias: bool = Field(
        default=True, description="A and B have biases (the paper); false: folds into bias-less and padded convs too"
    )
    channel_dim: Literal[1, -1] | None = Field(
        default=None, description="channels of the layer's input: 1 (NCHW) or -1 (tokens, NHWC); null: from the layer"
    )


class RepAdapter(nn.Module):
    """``x + s · B(dropout(A x))`` over one channel dim; ``B`` block-diagonal in ``groups`` blocks."""

    def __init__(self, channels: int, opts: RepAdapterOptions, dim: int) -> None:
        super().__init__()
        self.channel_dim, self.groups, self.scale = dim, opts.groups, opts.scale
        self.A = nn.Linear(channels, opts.dim, bias=opts.bias)
        self.B = nn.Parameter(torch.zeros(opts.groups, channels // opts.groups, opts.dim // opts.groups))
        self.B_bias = nn.Parameter(torch.zeros(channels)) if opts.bias else None
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.A.weight)  # the official init; B = 0 keeps the identity
        if self.A.bias is not None:
            nn.init.zeros_(self.A.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.channel_dim
        last = x if d == -1 else x.movedim(d, -1)
        h = self.dropout(self.A(last)).unflatten(-1, (self.groups, -1))  # (..., g, r/g)
        y = torch.einsum("...gi,goi->...go", h, self.B).flatten(-2)
        y = y if self.B_bias is None else y + self.B_bias
        out = last + self.scale * y
        return out if d == -1 else out.movedim(-1, d)

    def dense_B(self) -> torch.Tensor:
        """``B`` as one ``(C, r)`` matrix, zero outside the diagonal blocks."""
        return torch.block_diag(*self.B.unbind(0))

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge into the layer that reads it: ``x <- M x + c`` with ``M = I + s B A``, ``c = s (B b_A + b_B)``."""
        if tap != "input_map":
            raise NotMergeable(f"it does not stand for the input of {layer.path}")
        want = -1 if layer.kind == "linear" else 1
        if (layer.kind == "linear") != (self.channel_dim == -1):
            raise NotMergeable(f"it maps dim {self.channel_dim} but {layer.path} reads its channels on dim {want}")
        a, b = f64(self.A.weight), f64(self.dense_B())
        assert a is not None and b is not None
        m = torch.eye(a.shape[1], dtype=a.dtype) + self.scale * (b @ a)
        ba, bb = f64(self.A.bias), f64(self.B_bias)
        c = None if ba is None or bb is None else self.scale * (b @ ba + bb)
        layer.map_inputs(m, c)


@register
class RepAdapterKind(TunerKind):
    kind = "repadapter"
    Options = RepAdapterOptions
    summary = "x <- x + s*B(A x) before a layer, folded into it (RepAdapter, Luo et al. 2023, arXiv 2302.08106)"
    placements = ("sequential",)
    default_placement = "sequential"
    taps = {"sequential": ("input",)}  # it stands for what the site reads
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        if site.op not in ("module", "composite") or site.input is None:
            raise self.fail(site, f"it is a {site.op} site; RepAdapter goes before a layer or module with one input")

    def _channels(self, site: Site, ctx: PlanContext) -> tuple[int, int]:
        shape = ctx.shape(site, Tap("input"))
        if shape is None or len(shape) < 2:
            raise self.fail(site, "its input is not a tensor with a channel dim")
        mod, override = site.module, self.options.channel_dim
        if override is None and site.op == "module" and isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d):
            dim = -1 if isinstance(mod, nn.Linear) else 1  # what the layer reads its channels on
        else:
            dim = ctx.channel_dim(site, shape, override)
        return shape[dim], dim

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        opts: RepAdapterOptions = self.options
        channels, dim = self._channels(site, ctx)
        if channels % opts.groups or opts.dim % opts.groups:
            raise self.fail(
                site,
                f"groups={opts.groups} does not divide its {channels} channels and dim={opts.dim}",
                hint="pick groups that divide both (the paper: dim 8, groups 2)",
            )
        module = RepAdapter(channels, opts, dim)
        return [Attachment(site, module, "replace_input", (Tap("input"),))]

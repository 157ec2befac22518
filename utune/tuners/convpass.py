"""Convpass: a convolutional bypass, ``x' = OP(x) + s · W_up · drop(act(Conv3x3(act(W_down · x))))``.

Jie & Deng 2022, "Convolutional Bypasses Are Better Vision Transformer Adapters" (arXiv 2207.07039). Beside a
block's MHA and MLP (parallel: it reads the op's input, ``norm1(x)`` / ``norm2(x)``, and adds to its output), the
bottleneck (``dim`` = 8 channels) is laid out on the patch grid and convolved 3x3, restoring the spatial
locality plain adapters lack. The class token (and any register token: every token before the grid) is
handled as the official code does: it is convolved on its own as a 1x1 image, so it meets only the kernel's
centre tap and the bias. On CNN feature maps (``(B, C, H, W)``, or channels last) the bypass convolves the map
directly, the down/up projections being 1x1 convolutions. ``W_up`` starts at zero: identity at init (the 3x3
conv starts as the identity at its centre, or ``conv_init: xavier`` as some of the paper's task configs do).
Activations are QuickGELU (``x * sigmoid(1.702 x)``) as in the official code; ``s`` is a fixed scale the paper
searches per task (0.01-100). Not mergeable: the bypass is non-linear.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, cast

import torch
from pydantic import Field, PositiveInt
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.modules import ACTIVATIONS, channel_linear
from utune.tuners.prompt import prefix_tokens
from utune.tuners.registry import register


class ConvpassOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout",)

    dim: int = Field(default=8, gt=0, description="bottleneck channels of the 3x3 conv (8 in the paper)")
    scale: float = Field(default=1.0, description="s: a fixed scale of the bypass (the paper searches 0.01-100)")
    act: Literal["quick_gelu", "gelu"] = Field(default="quick_gelu", description="activation around the conv")
    conv_init: Literal["identity", "xavier"] = Field(
        default="identity", description="3x3 conv at init: the identity at its centre, or xavier (some task configs)"
    )
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout before W_up in training (0.1)")
    prefix_tokens: int | None = Field(
        default=None, ge=0, description="tokens before the patch grid (class, registers); null: read from the model"
    )
    grid: list[PositiveInt] | None = Field(
        default=None, min_length=2, max_length=2, description="[H, W] of the patch grid; null: the tokens' square"
    )
    channel_dim: Literal[1, -1] | None = Field(
        default=None, description="feature maps: channels at dim 1 (NCHW) or -1 (NHWC); null: decided from the layers"
    )


class Convpass(nn.Module):
    """The bypass on tokens ``(B, N, C)`` (``grid`` set: ``prefix`` tokens then an H x W grid) or maps."""

    def __init__(self, c_in: int, c_out: int, opts: ConvpassOptions, channel_dim: int, grid: tuple[int, int, int]):
        super().__init__()
        self.channel_dim, self.scale = channel_dim, opts.scale
        self.prefix, self.h, self.w = grid  # (0, 0, 0) for feature maps
        self.down, self.up = nn.Linear(c_in, opts.dim), nn.Linear(opts.dim, c_out)
        self.conv = nn.Conv2d(opts.dim, opts.dim, 3, padding=1)
        self.act = ACTIVATIONS[opts.act]()
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.down.weight)
        for t in (self.down.bias, self.up.weight, self.up.bias, self.conv.bias):
            nn.init.zeros_(cast(torch.Tensor, t))
        if opts.conv_init == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            with torch.no_grad():
                self.conv.weight.zero_()[:, :, 1, 1] = torch.eye(opts.dim)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Conv over the patch grid; each prefix token as its own 1x1 image (centre tap and bias only)."""
        b, _, d = h.shape
        grid = h[:, self.prefix :].reshape(b, self.h, self.w, d).permute(0, 3, 1, 2)
        grid = self.conv(grid).permute(0, 2, 3, 1).reshape(b, self.h * self.w, d)
        if not self.prefix:
            return grid
        cls = self.conv(h[:, : self.prefix].reshape(b * self.prefix, d, 1, 1)).reshape(b, self.prefix, d)
        return torch.cat([cls, grid], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.channel_dim
        h = self.act(channel_linear(x, self.down, d))
        if self.h:
            h = self._tokens(h)
        elif d == 1:
            h = self.conv(h)
        else:  # channels last
            h = self.conv(h.movedim(-1, 1)).movedim(1, -1)
        y = channel_linear(self.dropout(self.act(h)), self.up, d)
        return y * self.scale

    def extra_repr(self) -> str:
        return f"grid={self.prefix}+{self.h}x{self.w}" if self.h else "feature maps"


@register
class ConvpassKind(TunerKind):
    kind = "convpass"
    Options = ConvpassOptions
    summary = "x' = OP(x) + s*W_up*act(Conv3x3(act(W_down*tap))) on the patch grid (Convpass, Jie & Deng 2022)"

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        tap, out = ctx.shape(site, Tap(self.where)), ctx.output_shape(site)
        if tap is None or out is None or len(tap) != len(out) or len(out) not in (3, 4):
            raise self.fail(site, f"its tap {tap} and output {out} are not token sequences or feature maps")
        if len(out) == 3:
            if tap[1] != out[1]:
                raise self.fail(site, f"the tap has {tap[1]} tokens and the output {out[1]}")
            return Convpass(tap[-1], out[-1], self.options, -1, self._grid(site, ctx, tap[1]))
        d = ctx.channel_dim(site, out, self.options.channel_dim)
        if [s for i, s in enumerate(tap) if i not in (0, d % 4)] != [
            s for i, s in enumerate(out) if i not in (0, d % 4)
        ]:
            raise self.fail(
                site,
                f"the tap {list(tap)} and the output {list(out)} differ in resolution",
                hint="select blocks that keep their resolution (not a stage's downsampling block)",
            )
        return Convpass(tap[d], out[d], self.options, d, (0, 0, 0))

    def _grid(self, site: Site, ctx: PlanContext, tokens: int) -> tuple[int, int, int]:
        opts: ConvpassOptions = self.options
        prefix = opts.prefix_tokens if opts.prefix_tokens is not None else prefix_tokens(ctx.root)
        n = tokens - prefix
        if opts.grid is not None:
            h, w = opts.grid
        else:
            h = w = math.isqrt(max(n, 0))
        if n <= 0 or h * w != n:
            raise self.fail(
                site,
                f"its {tokens} tokens minus {prefix} prefix token(s) do not form a {h}x{w} patch grid",
                hint="set grid: [H, W] and prefix_tokens: N in the rule",
            )
        return prefix, h, w

"""Bottleneck adapter: ``U(x) = s ⊙ W_up · act(W_down · x)``.

Houlsby et al. 2019 (sequential on FFN), AdaptFormer (Chen et al. 2022, parallel on FFN, dim 64,
scale 0.1, dropout 0.1 on the bottleneck), U-Tuning's P-Adapter (Jiang et al. 2023, parallel, per-channel
scale), Adapter+ (Steitz & Roth 2024, arXiv 2406.06820: sequential after the block, channel scale,
``init: houlsby``). Identity at init: ``W_up`` starts at zero (``init: xavier`` gives the papers' code init
instead, ``init: houlsby`` Houlsby's truncated N(0, 0.01) for both projections; neither is the identity).
``dropout`` (training only) acts on the bottleneck, after the activation and before ``W_up``, as AdaptFormer's
and NOAH's code do.
On token tensors ``(B, N, C)`` it maps the last dim; on feature maps ``(B, C, H, W)`` it is a
channel bottleneck of 1x1 convolutions. A parallel adapter beside a CNN stage that downsamples by an
integer factor average-pools its input by that factor first (as ResNet-D's shortcut does); by another factor
(an unpadded stride-2 conv: 112 -> 55), adaptively to the stage's output size. Beside a stage that merges a
square grid of tokens (LeViT, MViTv2, Hiera: n² tokens in, m² out) it pools its tap on that grid. The channel
dim of the tap and of the output are each read from the graph (:mod:`utune.graph.layout`); a tap laid out
otherwise than the output (an NCHW image beside an NHWC stage) is refused.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.modules import ACTIVATIONS, DropPath, Scale, channel_linear, kaiming_linear_
from utune.tuners.registry import register


class AdapterOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("drop_path", "dropout")  # training noise: no weight depends on it

    dim: int = Field(default=10, gt=0, description="bottleneck width L (10 in U-Tuning/Res-Tuning, 64 in AdaptFormer)")
    act: Literal["gelu", "quick_gelu", "relu", "silu", "identity"] = Field(
        default="gelu",
        description="activation between W_down and W_up (quick_gelu: x*sigmoid(1.702x), NOAH's); identity makes "
        "the adapter linear (mergeable)",
    )
    scale: Literal["none", "scalar", "channel", "gate"] | float = Field(
        default="channel",
        description="s: none, a learned scalar, a learned per-channel vector (best in U-Tuning), an input gate, "
        "or a fixed number (AdaptFormer: 0.1)",
    )
    init: Literal["zero", "xavier", "houlsby"] = Field(
        default="zero",
        description="zero: W_up = 0, identity at init; xavier: the papers' code init; houlsby: both projections "
        "~ N(0, 0.01) truncated at 2 std (Adapter+); the last two are not the identity",
    )
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="dropout on the bottleneck (after act, before W_up) in training (AdaptFormer, NOAH: 0.1)",
    )
    drop_path: float = Field(
        default=0.0, ge=0, lt=1, description="stochastic depth on the adapter's output in training (Adapter+: 0.1)"
    )
    channel_dim: Literal[1, -1] | None = Field(
        default=None, description="feature maps: channels at dim 1 (NCHW) or -1 (NHWC); null: decided from the layers"
    )


class Adapter(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, opts: AdapterOptions, dim: int, pool: int | tuple[int, int] = 1, grid: int = 0
    ) -> None:
        super().__init__()
        self.channel_dim = dim
        self.pool = pool
        self.grid = grid  # tokens (B, N, C) pooled on their sqrt(N) x sqrt(N) grid (a token-merging stage)
        self.down = nn.Linear(c_in, opts.dim)
        self.act = ACTIVATIONS[opts.act]()
        # no module (and no op in the graph) at 0: specs without dropout build what they always built
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else None
        self.up = nn.Linear(opts.dim, c_out)
        self.scale = Scale(opts.scale, c_out, c_in)
        self.drop_path = DropPath(opts.drop_path) if opts.drop_path > 0 else nn.Identity()
        _init(self.down, self.up, opts.init)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``U(x) = M x + c``, for an adapter whose activation is the identity."""
        if not isinstance(self.act, nn.Identity):
            raise NotMergeable(
                f"its activation ({type(self.act).__name__}) is not linear; only `act: identity` adapters fold"
            )
        if self.pool != 1:
            raise NotMergeable(f"it average-pools its input by {self.pool} (beside a downsampling stage)")
        mode = self.scale.mode
        if mode == "gate":
            raise NotMergeable("its gate depends on the input")
        wd, bd, wu, bu = (f64(t) for t in (self.down.weight, self.down.bias, self.up.weight, self.up.bias))
        assert wd is not None and wu is not None and bd is not None and bu is not None
        m, c = wu @ wd, wu @ bd + bu
        if mode == "const":
            m, c = m * self.scale.const, c * self.scale.const
        elif mode in ("scalar", "channel"):
            s = f64(self.scale.weight)
            assert s is not None
            m, c = (s[:, None] if mode == "channel" else s) * m, s * c
        return m, c

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge a linear adapter beside (``W' = W + M``, ``b' = b + c``) or after (``W' = (I + M) W``) a layer."""
        m, c = self.affine()
        layer.check_axis(self.channel_dim, "the adapter")
        if tap == "input":
            layer.add_input_map(m, c)
        elif tap == "output":
            layer.mix_outputs(torch.eye(m.shape[0], dtype=m.dtype) + m, c)
        else:
            raise NotMergeable(f"it replaces {layer.path}'s output instead of adding to it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.channel_dim
        if self.grid:  # (B, N, C) -> (B, C, n, n) -> pooled -> (B, M, C)
            x = _pool(x.transpose(1, 2).unflatten(2, (self.grid, self.grid)), self.pool).flatten(2).transpose(1, 2)
        elif self.pool != 1:  # NCHW: pool H, W; NHWC: move channels first, pool, move back
            x = _pool(x, self.pool) if d == 1 else _pool(x.movedim(-1, 1), self.pool).movedim(1, -1)
        h = self.act(channel_linear(x, self.down, d))
        if self.dropout is not None:
            h = self.dropout(h)
        y = self.drop_path(channel_linear(h, self.up, d))
        if self.scale.mode in ("none", "const"):
            return self.scale(y)
        last = y if d == -1 else y.movedim(d, -1)
        xin = None if self.scale.mode != "gate" else (x if d == -1 else x.movedim(d, -1))
        out = self.scale(last, xin)
        return out if d == -1 else out.movedim(-1, d)


def _init(down: nn.Linear, up: nn.Linear, how: str) -> None:
    """zero: LoRA-like (W_up = 0); xavier: the U-Tuning/NOAH code; houlsby: truncated N(0, 0.01), biases 0."""
    for layer in (down, up):
        nn.init.zeros_(layer.bias)
        if how == "xavier":
            nn.init.xavier_uniform_(layer.weight)
        elif how == "houlsby":  # Houlsby et al. 2019 as Adapter+ implements it: std 0.01, cut at +-2 std
            nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
    if how == "zero":
        kaiming_linear_(down)
        nn.init.zeros_(up.weight)


@register
class AdapterKind(TunerKind):
    kind = "adapter"
    Options = AdapterOptions
    summary = "x' = OP(x) + s*W_up*act(W_down*tap); Houlsby 2019, AdaptFormer 2022, U-Tuning P-Adapter 2023"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """Only ``init: zero`` starts as the base model (the registry's probe has no rule: the default)."""
        opts = getattr(self, "options", None)
        return opts is None or opts.init == "zero"

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        opts: AdapterOptions = self.options
        tap_shape = ctx.shape(site, Tap(self.where))
        out_shape = ctx.output_shape(site)
        if tap_shape is None or out_shape is None:
            raise self.fail(site, "its input or output is not a single tensor")
        if len(tap_shape) != len(out_shape) or len(out_shape) not in (2, 3, 4):
            raise self.fail(site, f"tap shape {list(tap_shape)} and output shape {list(out_shape)} do not fit")
        dim = ctx.channel_dim(site, out_shape, opts.channel_dim)
        if opts.channel_dim is None and (found := ctx.tap_channel_dim(site, Tap(self.where))) is not None:
            if found % len(tap_shape) != dim % len(out_shape):
                raise self.fail(
                    site,
                    f"its tap {list(tap_shape)} has channels on dim {found}, its output {list(out_shape)} on dim {dim}",
                    hint="tap a value laid out like the output, or select another site",
                )
        c_out = out_shape[dim]
        c_in = tap_shape[dim]
        spatial_in = [s for i, s in enumerate(tap_shape[1:], 1) if i != dim % len(tap_shape)]
        spatial_out = [s for i, s in enumerate(out_shape[1:], 1) if i != dim % len(out_shape)]
        pool = _pooling(spatial_in, spatial_out) if len(out_shape) == 4 else None
        grid = _token_grid(tap_shape, out_shape) if len(out_shape) == 3 and dim % 3 == 2 else None
        if grid is not None:  # a stage that merges a square grid of tokens (MViTv2, LeViT, Hiera)
            pool = grid[0] // grid[1]
        if spatial_in != spatial_out and pool is None:
            raise self.fail(
                site,
                f"the tap {list(tap_shape)} and the output {list(out_shape)} differ in tokens/resolution",
                hint="use placement: sequential (the adapter then reads the output) or another site",
            )
        return Adapter(c_in, c_out, opts, dim, pool or 1, grid[0] if grid else 0)


def _pool_factor(spatial_in: list[int], spatial_out: list[int]) -> int | None:
    """The integer factor by which a stage downsamples (same in H and W), or None."""
    if spatial_in == spatial_out:
        return 1
    ratios = {a // b for a, b in zip(spatial_in, spatial_out, strict=True) if b and a % b == 0}
    ok = len(ratios) == 1 and all(b and a % b == 0 for a, b in zip(spatial_in, spatial_out, strict=True))
    return ratios.pop() if ok else None


def _pooling(spatial_in: list[int], spatial_out: list[int]) -> int | tuple[int, int] | None:
    """How the tap is pooled to the output's (H, W): an integer factor, else adaptively to the output size
    (a stage that shrinks by another factor); None when the output is not smaller in both."""
    factor = _pool_factor(spatial_in, spatial_out)
    if factor is not None:
        return factor
    pairs = list(zip(spatial_in, spatial_out, strict=True))
    return (spatial_out[0], spatial_out[1]) if len(pairs) == 2 and all(0 < b <= a for a, b in pairs) else None


def _token_grid(tap: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, int] | None:
    """(n, m) when N = n² tokens become M = m² (n a multiple of m, no class token): the stage pools its token
    grid, so the adapter pools its tap the same way, read in row-major order (Hiera's unrolled token order
    groups neighbours otherwise: there the pooled tokens are not spatial neighbours, and the adapter is
    still the identity at init)."""
    n, m = math.isqrt(tap[1]), math.isqrt(out[1])
    if tap[1] == out[1] or n * n != tap[1] or m * m != out[1] or m == 0 or n % m:
        return None
    return n, m


def _pool(x: torch.Tensor, pool: int | tuple[int, int]) -> torch.Tensor:
    return F.avg_pool2d(x, pool) if isinstance(pool, int) else F.adaptive_avg_pool2d(x, pool)

"""Two tuner kinds written outside utune, against the public API ``utune.kinds``.

- ``GatedAdapter``: ``x' = OP(x) + tanh(g) · W_up GELU(W_down · tap)``, ``g = 0`` at init (a zero-init
  gate, as LLaMA-Adapter gates its prompts): the model starts as the base one, and the gate learns how much
  of the adapter to let through. Not mergeable (GELU).
- ``LinearAdapter``: ``x' = OP(x) + s · B A · tap`` beside a Linear layer, ``B = 0`` at init. Linear, so it
  folds into the layer (``export --merge``): ``W' = W + s B A``, ``b' = b + s (B b_A + b_B)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.kinds import Layer, NotMergeable, PlanContext, Site, Tap, TunerKind, TunerOptions, f64


def _channels(kind: TunerKind, site: Site, ctx: PlanContext) -> tuple[int, int, int]:
    """(tap channels, output channels, channel dim) of a site whose tap and output differ only in channels."""
    tap, out = ctx.shape(site, Tap(kind.where)), ctx.output_shape(site)
    if tap is None or out is None or len(tap) != len(out):
        raise kind.fail(site, "its input or output is not one tensor of the same rank")
    dim = ctx.channel_dim(site, out) % len(out)
    if [s for i, s in enumerate(tap) if i != dim] != [s for i, s in enumerate(out) if i != dim]:
        raise kind.fail(site, f"its input {list(tap)} and output {list(out)} differ in more than channels")
    return tap[dim], out[dim], dim


class GatedAdapterOptions(TunerOptions):
    dim: int = Field(default=8, gt=0, description="bottleneck width")


class GatedAdapterModule(nn.Module):
    def __init__(self, c_in: int, c_out: int, dim: int, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.down = nn.Linear(c_in, dim)
        self.up = nn.Linear(dim, c_out)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: the identity at init, bit-exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.movedim(self.channel_dim, -1)
        y = torch.tanh(self.gate) * self.up(F.gelu(self.down(last)))
        return y.movedim(-1, self.channel_dim)


class GatedAdapter(TunerKind):
    """x' = OP(x) + tanh(g) * W_up GELU(W_down tap), g = 0 at init."""

    Options = GatedAdapterOptions
    summary = "x' = OP(x) + tanh(g)*W_up*GELU(W_down*tap), a zero-init gate (example kind)"

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        c_in, c_out, dim = _channels(self, site, ctx)
        return GatedAdapterModule(c_in, c_out, self.options.dim, dim)


class LinearAdapterOptions(TunerOptions):
    rank: int = Field(default=4, gt=0, description="r: the width of A")
    scale: float = Field(default=1.0, description="s: a fixed scale of the adapter's output")


class LinearAdapterModule(nn.Module):
    def __init__(self, c_in: int, c_out: int, opts: LinearAdapterOptions) -> None:
        super().__init__()
        self.scale = opts.scale
        self.A = nn.Linear(c_in, opts.rank)
        self.B = nn.Linear(opts.rank, c_out)
        nn.init.zeros_(self.B.weight)
        nn.init.zeros_(self.B.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.B(self.A(x))

    def fold(self, layer: Layer, tap: str) -> None:
        """``y + s B A x`` beside a Linear reading ``x``: ``W += s B A``, ``b += s (B b_A + b_B)``."""
        if tap != "input" or layer.kind != "linear":
            raise NotMergeable(f"it folds beside a Linear reading its input, not at {layer.path} (tap {tap})")
        a_w, a_b, b_w, b_b = (f64(t) for t in (self.A.weight, self.A.bias, self.B.weight, self.B.bias))
        assert a_w is not None and a_b is not None and b_w is not None and b_b is not None
        layer.add_input_map(self.scale * (b_w @ a_w), self.scale * (b_w @ a_b + b_b))


class LinearAdapter(TunerKind):
    """x' = OP(x) + s * B A tap beside a Linear layer; folds into it."""

    Options = LinearAdapterOptions
    summary = "x' = Wx + b + s*B*A*x beside a Linear, B = 0 at init; folds (example kind)"
    placements = ("parallel",)
    taps = {"parallel": ("input",)}
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        if not isinstance(site.module, nn.Linear) or site.op != "module":
            raise self.fail(site, f"it is a {site.type}; a linear adapter goes beside a Linear layer")

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        assert isinstance(site.module, nn.Linear)  # check() refused the rest
        return LinearAdapterModule(site.module.in_features, site.module.out_features, self.options)

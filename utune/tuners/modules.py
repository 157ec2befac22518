"""Small building blocks shared by tuner kinds (channel-wise linear maps, scales)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ScaleMode = Literal["none", "scalar", "channel", "gate"] | float


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: CLIP's GELU approximation, which Convpass and NOAH's adapters use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


class Scale(nn.Module):
    """``s`` of ``x' = OP(x) + s ⊙ U(x)``: none, a learned scalar, a per-channel vector, an input gate, or a constant.

    The gate is U-Tuning's input-dependent variant: ``sigmoid(Linear(x))`` averaged over tokens/pixels.
    """

    def __init__(self, mode: ScaleMode, channels: int, in_channels: int | None = None) -> None:
        super().__init__()
        self.mode = "const" if isinstance(mode, int | float) and not isinstance(mode, bool) else str(mode)
        self.const = float(mode) if self.mode == "const" else 1.0
        if self.mode == "scalar":
            self.weight = nn.Parameter(torch.ones(1))
        elif self.mode == "channel":
            self.weight = nn.Parameter(torch.ones(channels))
        elif self.mode == "gate":
            self.gate = nn.Linear(in_channels or channels, 1)
        elif self.mode not in ("none", "const"):
            raise ValueError(f"unknown scale {mode!r}")

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Scale ``y`` (channels last); ``x`` (channels last) feeds the gate."""
        if self.mode == "none":
            return y
        if self.mode == "const":
            return y * self.const
        if self.mode == "gate":
            assert x is not None  # internal: the adapter always passes its input
            g = torch.sigmoid(self.gate(x))  # (B, ..., 1)
            g = g.flatten(1, -2).mean(1) if g.ndim > 2 else g  # average over tokens / pixels -> (B, 1)
            return y * g.view(g.shape[0], *([1] * (y.ndim - 1)))
        return y * self.weight


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole output of a sample with probability p (and rescale)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def kaiming_linear_(layer: nn.Linear) -> None:
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))


def channel_linear(x: torch.Tensor, layer: nn.Linear, dim: int) -> torch.Tensor:
    """``layer`` applied over channel dim ``dim`` (1 for NCHW maps, -1 for tokens / NHWC)."""
    if dim == -1 or dim == x.ndim - 1:
        return layer(x)
    if x.ndim == 4 and dim == 1:  # 1x1 convolution: no permute copies on NCHW maps
        w = layer.weight.view(*layer.weight.shape, 1, 1)
        return F.conv2d(x, w, layer.bias)
    return layer(x.movedim(dim, -1)).movedim(-1, dim)


def channel_view(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over a tensor of ``ndim`` dims with channels at ``dim``."""
    if dim == -1 or dim == ndim - 1:
        return v
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)

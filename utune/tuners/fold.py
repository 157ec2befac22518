"""Folding a tuner into the base layer it modifies: float64 working copies of the layer's weight and bias,
and the four algebraic moves every mergeable tuner reduces to (scale/shift its outputs, add a map of its
input, mix its outputs, map its inputs before it). Each tuner module that can fold has a ``fold(layer, tap)``
method using them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class NotMergeable(Exception):
    """One tuner at one site cannot fold; ``str(e)`` says why."""


# ---- the layer being folded into ----------------------------------------------------------------------

_TIMM_NORMS = {"RmsNorm", "RmsNorm2d"}  # timm norms outside torch's classes: y = w ⊙ x / rms(x)


def layer_kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    torch_norms = (nn.LayerNorm, _BatchNorm, nn.GroupNorm, nn.RMSNorm)
    if isinstance(mod, torch_norms) or type(mod).__name__ in _TIMM_NORMS:
        return "norm"
    return None


def _channel_axis(mod: nn.Module, kind: str, ndim: int | None) -> int | None:
    """The output axis holding the layer's channels (non-negative when ``ndim`` is known, else -1 or 1)."""
    last = ndim - 1 if ndim is not None else -1
    if kind == "linear":
        return last
    if kind == "conv" or isinstance(mod, (_BatchNorm, nn.GroupNorm)):
        return 1
    return 1 if "2d" in type(mod).__name__.lower() else last  # LayerNorm2d, RmsNorm2d: NCHW


@dataclass
class Layer:
    """Float64 working copies of one base layer's weight and bias, and what the layer is."""

    path: str
    module: nn.Module
    kind: str  # linear | conv | norm
    ndim: int | None  # rank of the layer's output tensor, when shape propagation recorded it
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    folded: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        assert self.weight is not None or self.bias is not None
        return int((self.weight if self.weight is not None else self.bias).shape[0])  # type: ignore[union-attr]

    @property
    def axis(self) -> int | None:
        return _channel_axis(self.module, self.kind, self.ndim)

    def check_axis(self, dim: int, what: str) -> None:
        """The tuner's channel dim ``dim`` (1 or -1) must be the axis the layer's channels are on."""
        want = self.axis
        got = dim % self.ndim if self.ndim is not None else dim
        if want is not None and got != want:
            raise NotMergeable(f"{what} acts on dim {dim} of the output but {self.path}'s channels are on dim {want}")

    def _need_bias(self, c: torch.Tensor | None, why: str) -> None:
        if self.bias is None and c is not None and bool(c.ne(0).any()):
            raise NotMergeable(f"{self.path} ({type(self.module).__name__}) has no bias to hold the {why}")

    def scale_shift(self, s: torch.Tensor | None, t: torch.Tensor | None) -> None:
        """``y <- s ⊙ y + t`` per output channel."""
        n = self.channels
        for v, name in ((s, "scale"), (t, "shift")):
            if v is not None and v.numel() != n:
                raise NotMergeable(f"its {name} has {v.numel()} channels, {self.path} has {n}")
        if self.weight is None and s is not None and bool(s.ne(1).any()):
            raise NotMergeable(f"{self.path} ({type(self.module).__name__}) has no affine weight to hold the scale")
        self._need_bias(t, "shift")
        if s is not None and self.weight is not None:
            self.weight = s.view(-1, *[1] * (self.weight.ndim - 1)) * self.weight
        if self.bias is not None:
            if s is not None:
                self.bias = s * self.bias
            if t is not None:
                self.bias = self.bias + t

    def add_input_map(self, delta: torch.Tensor, c: torch.Tensor | None) -> None:
        """``y <- y + ΔW x + c`` with ``ΔW`` shaped like the weight (x: the layer's own input)."""
        if self.kind == "norm" or self.weight is None:
            raise NotMergeable(f"{self.path} is a {type(self.module).__name__}; a map of its input cannot fold into it")
        if self.kind == "conv" and delta.ndim == 2:  # a channel map beside a 1x1, stride-1, unpadded conv
            mod = self.module
            pointwise = all(k == 1 for k in mod.kernel_size) and all(s == 1 for s in mod.stride)  # type: ignore[union-attr]
            if not pointwise or any(p != 0 for p in mod.padding) or mod.groups != 1:  # type: ignore[union-attr]
                raise NotMergeable(f"a channel map beside {self.path} folds only into a 1x1, stride-1, unpadded conv")
            delta = delta.view(*delta.shape, *[1] * (self.weight.ndim - 2))
        if tuple(delta.shape) != tuple(self.weight.shape):
            raise NotMergeable(
                f"its weight change {list(delta.shape)} does not fit {self.path} {list(self.weight.shape)}"
            )
        self._need_bias(c, "added bias")
        self.weight = self.weight + delta
        if c is not None and self.bias is not None:
            self.bias = self.bias + c

    def scale_shift_inputs(self, s: torch.Tensor | None, t: torch.Tensor | None) -> None:
        """``y <- W (s ⊙ x + t) + b``: ``W' = W diag(s)`` (its input columns), ``b' = b + W t``."""
        if self.kind == "norm" or self.weight is None:
            raise NotMergeable(f"{self.path} normalises its input, so a change of that input cannot fold into it")
        groups = getattr(self.module, "groups", 1)
        c_in = int(self.weight.shape[1]) * groups
        for v, name in ((s, "scale"), (t, "shift")):
            if v is not None and v.numel() != c_in:
                raise NotMergeable(f"its {name} has {v.numel()} channels, {self.path} reads {c_in}")
        if groups != 1 and ((s is not None and bool(s.ne(1).any())) or t is not None):
            raise NotMergeable(f"{self.path} is a grouped conv; a per-channel change of its input does not fold here")
        if t is not None and bool(t.ne(0).any()):
            if self.kind == "conv" and any(p != 0 for p in getattr(self.module, "padding", (0,))):
                raise NotMergeable(
                    f"{self.path} pads its input with zeros, so a shift of that input differs at the border"
                )
            self._need_bias(t, "shift of its input")
            w2 = self.weight.flatten(2).sum(2) if self.weight.ndim > 2 else self.weight  # (out, in)
            if self.bias is not None:
                self.bias = self.bias + w2 @ t
        if s is not None:
            self.weight = self.weight * s.view(1, -1, *[1] * (self.weight.ndim - 2))

    def map_inputs(self, m: torch.Tensor, c: torch.Tensor | None) -> None:
        """``x <- M x + c`` before the layer (a map of its own input channels): ``W' = W M``, ``b' = b + W c``."""
        if self.kind not in ("linear", "conv") or self.weight is None:
            raise NotMergeable(
                f"{self.path} is a {type(self.module).__name__}; only a Linear or Conv takes a map of its input"
            )
        groups = getattr(self.module, "groups", 1)
        if groups != 1 or tuple(m.shape) != (self.weight.shape[1], self.weight.shape[1]):
            raise NotMergeable(
                f"its channel map {list(m.shape)} does not fit the input of {self.path} (groups={groups})"
            )
        w = self.weight
        pad = getattr(self.module, "padding", "valid")
        padded = self.kind == "conv" and (pad == "same" or (not isinstance(pad, str) and any(p != 0 for p in pad)))
        if c is not None and bool(c.ne(0).any()) and padded:
            raise NotMergeable(f"{self.path} pads its input, so a shift of the input is not a shift of the output")
        shift = None if c is None else (w.flatten(2).sum(-1) if w.ndim > 2 else w) @ c
        self._need_bias(shift, "shift of its input")
        self.weight = torch.tensordot(w, m, dims=([1], [0])).movedim(-1, 1)
        if shift is not None and self.bias is not None:
            self.bias = self.bias + shift

    def mix_outputs(self, a: torch.Tensor, c: torch.Tensor | None) -> None:
        """``y <- A y + c`` over output channels."""
        if self.kind == "norm" or self.weight is None:
            raise NotMergeable(
                f"a channel mix cannot fold into {self.path} ({type(self.module).__name__}), "
                "which has one weight per channel"
            )
        if self.kind == "conv" and getattr(self.module, "groups", 1) != 1:
            raise NotMergeable(f"a channel mix cannot fold into the grouped conv {self.path}")
        if tuple(a.shape) != (self.channels, self.channels):
            raise NotMergeable(f"its channel mix {list(a.shape)} does not fit {self.path}'s {self.channels} channels")
        self._need_bias(c, "added bias")
        self.weight = torch.tensordot(a, self.weight, dims=([1], [0]))
        if self.bias is not None:
            self.bias = a @ self.bias + (c if c is not None else 0)


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)

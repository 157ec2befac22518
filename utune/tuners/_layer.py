"""Support for the kinds that change a layer's weight (DoRA, LoHa, LoKr, OFT, BOFT, VeRA, GLoRA): which layers
they take, the frozen tensors they read, and the layer's geometry, so that a weight change runs exactly as the
layer runs its own weight (``F.linear``, or ``F.conv2d`` with the layer's stride, padding, dilation, groups).

Where their math needs the frozen weight itself (DoRA's norm, GLoRA's ``W ⊙ A``) they read it as a
:class:`~utune.graph.manifest.Frozen` value, never a copy, and fold with the original tensors
(``layer.module``), which is what they read, whatever folded into the layer before them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from utune.graph.manifest import Frozen
from utune.tuners.base import TunerKind
from utune.tuners.fold import NotMergeable, f64

if TYPE_CHECKING:
    from utune.graph.context import PlanContext
    from utune.graph.sites import Site
    from utune.tuners.fold import Layer

BaseLayer = nn.Linear | nn.Conv2d


def layer_path(site: Site) -> str:
    """The module path of a module site (``blocks.0.attn.qkv``; a second call's ``@2`` dropped)."""
    return site.path.split("@")[0]


def frozen_weight_bias(site: Site) -> tuple[Frozen, Frozen]:
    """The layer's own weight and bias as the tuner reads them (a missing bias reads as None)."""
    path = layer_path(site)
    return Frozen(f"{path}.weight"), Frozen(f"{path}.bias")


def weight_layer(kind: TunerKind, site: Site, *, conv: bool, why_not_conv: str = "") -> BaseLayer:
    """The site's Linear (or, when the kind takes one, Conv2d); SelectionError saying what to select instead."""
    mod = site.module
    takes = "a Linear or Conv2d" if conv else "a Linear"
    if site.op != "module" or not isinstance(mod, nn.Linear | nn.Conv2d):
        raise kind.fail(
            site,
            f"it is a {site.type} ({site.op}); {kind.kind} changes the weight of {takes} layer",
            hint="select layers with `type: Linear`" + (" or `type: Conv2d`" if conv else "") + ", or a glob ending "
            "in the layer name",
        )
    if isinstance(mod, nn.Conv2d):
        if not conv:
            raise kind.fail(site, f"it is a Conv2d; {why_not_conv}", hint="select Linear layers (`type: Linear`)")
        if mod.padding_mode != "zeros":
            raise kind.fail(
                site,
                f"it pads with {mod.padding_mode!r}; the weight change is run with zero padding",
                hint="exclude this layer from the rule",
            )
    return mod


class Geometry:
    """How the base layer applies a weight: ``F.linear`` or ``F.conv2d`` with its stride, padding, dilation,
    groups. A plain object (no tensors): it travels with the tuner module through copies and pickles."""

    def __init__(self, base: BaseLayer) -> None:
        self.shape = tuple(base.weight.shape)
        self.conv = isinstance(base, nn.Conv2d)
        if isinstance(base, nn.Conv2d):
            self.stride = cast(tuple[int, int], base.stride)
            self.padding = cast(tuple[int, int] | str, base.padding)
            self.dilation = cast(tuple[int, int], base.dilation)
            self.groups = base.groups

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        """The flattened input side of the weight: ``in`` (Linear), ``in/groups · k · k`` (Conv2d)."""
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if not self.conv:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def channels_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the layer's output (last dim, or dim 1 for maps)."""
        return v.view(1, -1, *[1] * (ndim - 2)) if self.conv else v


class WeightDelta(nn.Module):
    """A tuner whose output is ``ΔW x``, run as the layer runs its own weight (:class:`Geometry`), and whose
    merge is ``W += ΔW`` (LoHa, LoKr). Subclasses set ``geometry`` and define :meth:`delta_weight`."""

    geometry: Geometry

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.geometry(x, self.delta_weight())

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W' = W + ΔW``."""
        if tap != "input":
            raise NotMergeable(f"it does not read the input of {layer.path}")
        layer.add_input_map(cast(torch.Tensor, f64(self.delta_weight())), None)


class DeltaWeightKind(TunerKind):
    """The kind-side half every :class:`WeightDelta` tuner shares: parallel on a Linear/Conv2d's own input
    (so it folds into W), mergeable, built as ``module(layer, options)``. A kind sets ``module``."""

    module: ClassVar[type[nn.Module]]  # its __init__ takes (layer, options)
    placements = ("parallel",)
    taps = {"parallel": ("input",)}  # ΔW reads the layer's own input: it folds into W
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        weight_layer(self, site, conv=True)

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        return type(self).module(cast(BaseLayer, site.module), self.options)  # check() made sure


def original(layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 copies of the layer's own frozen weight and bias, as a tuner reading them saw them (not what
    earlier folds made of ``layer.weight``)."""
    weight, bias = getattr(layer.module, "weight", None), getattr(layer.module, "bias", None)
    assert isinstance(weight, torch.Tensor)  # a Linear/Conv: the kinds select nothing else
    return cast(torch.Tensor, f64(weight)), f64(bias) if isinstance(bias, torch.Tensor) else None

"""LoHa: ``y = W x + ΔW x``, ``ΔW = (alpha/r) · (W1a W1b) ⊙ (W2a W2b)`` (Hadamard product of two rank-r terms:
FedPara, Hyeon-Woo et al. 2022, arXiv 2108.06098; LoHa as LyCORIS and PEFT define it, arXiv 2309.14859).

Two rank-r factors multiplied element-wise reach rank r² for the parameters of two rank-r LoRAs. As in PEFT,
``W1a, W1b, W2a`` start Kaiming-uniform and ``W2b`` at zero, so ``ΔW = 0`` at init (exactly the base), and
``ΔW x`` runs as the layer runs its own weight: ``F.linear``, or ``F.conv2d`` with the layer's stride, padding,
dilation and groups (a Conv2d's ``ΔW`` is the flattened ``(out, in/groups · k · k)`` form reshaped, PEFT's
default; so grouped and depthwise convolutions take LoHa as they are). Mergeable: ``W += ΔW``.
Not offered: PEFT's rank/module dropout and its CP-decomposed ("effective") Conv2d form.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from utune.tuners._layer import BaseLayer, DeltaWeightKind, Geometry, WeightDelta
from utune.tuners.base import TunerOptions
from utune.tuners.registry import register


class LohaOptions(TunerOptions):
    rank: int = Field(default=8, gt=0, description="r of each of the two low-rank factors (ΔW reaches rank r²)")
    alpha: float | None = Field(default=None, gt=0, description="scaling = alpha / r; null: alpha = r (scaling 1)")


class Loha(WeightDelta):
    """``ΔW x`` with ``ΔW = (alpha/r) (W1a W1b) ⊙ (W2a W2b)`` (PEFT's tensor names and shapes)."""

    def __init__(self, base: BaseLayer, opts: LohaOptions) -> None:
        super().__init__()
        self.geometry = Geometry(base)
        out, fan, r = self.geometry.out_features, self.geometry.fan_in, opts.rank
        self.scaling = (opts.alpha if opts.alpha is not None else r) / r
        self.hada_w1_a = nn.Parameter(torch.empty(out, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, fan))
        self.hada_w2_a = nn.Parameter(torch.empty(out, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, fan))  # zero: ΔW = 0 at init
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        dw = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (dw if self.scaling == 1.0 else dw * self.scaling).reshape(self.geometry.shape)


@register
class LohaKind(DeltaWeightKind):
    kind = "loha"
    module = Loha
    Options = LohaOptions
    summary = "y = W x + (alpha/r) (W1a W1b) * (W2a W2b) x on a Linear/Conv2d; LoHa (FedPara 2022, LyCORIS)"

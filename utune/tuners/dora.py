"""DoRA: ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` with ``ΔW = (alpha/r) B A`` (Liu et al. 2024, arXiv 2402.09353).

The frozen weight is split into a magnitude ``m`` (one per output row, initialised to ``‖W‖`` of that row) and
a direction, which LoRA updates. As in the paper (section 4.3) and PEFT, the norm ``‖W + ΔW‖`` is treated as
a constant (detached). The layer keeps computing ``y = W x + b``; DoRA replaces it by
``y + (m/‖W+ΔW‖ - 1) ⊙ (y - b) + (m/‖W+ΔW‖) ⊙ ΔW x`` (PEFT's form: no second matmul with ``W``), which is the
base output exactly at init (``m = ‖W‖``, ``B = 0``). Row norms are PEFT's: over each output row of a Linear,
over ``(in/groups, k, k)`` of each output channel of a Conv2d.

``slices: [q, v]`` on a fused qkv Linear (timm's ViT): LoRA and a magnitude only for the q and v rows, the k
rows exactly frozen, which is DoRA on W_q and W_v. LoRA's dropout (``dropout``) drops the LoRA branch's input
only; PEFT with dropout > 0 also runs the magnitude term on the dropped-out input (training only; they agree in
eval and without dropout). Mergeable: ``W' = s ⊙ (W + ΔW)``, ``b' = s ⊙ b + (1 - s) ⊙ b₀`` with
``s = m / ‖W₀ + ΔW‖``. Grouped convolutions use LoRA's per-group form.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners._layer import BaseLayer, Geometry, frozen_weight_bias, original, weight_layer
from utune.tuners.base import TunerKind, is_fused_qkv
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.lora import SLICES, Lora, LoraOptions
from utune.tuners.registry import register


class DoraOptions(LoraOptions):
    pass  # LoRA's: rank, alpha, dropout, slices (the magnitude needs no option)


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """‖W‖ of each output row (Linear) or output channel (Conv2d: over in/groups, k, k)."""
    return torch.linalg.vector_norm(w.flatten(1), dim=1)


class Dora(nn.Module):
    """The DoRA of one layer: its LoRA (the direction's update) and the magnitudes of its tuned rows."""

    index: torch.Tensor | None

    def __init__(self, base: BaseLayer, opts: DoraOptions, index: torch.Tensor | None) -> None:
        super().__init__()
        self.lora = Lora(base, opts)
        self.geometry = Geometry(base)
        self.register_buffer("index", index, persistent=False)  # the rows with a magnitude (slices); None: all
        norm = row_norm(base.weight.detach())
        self.magnitude = nn.Parameter(norm if index is None else norm[index].clone())

    def scale(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``m / ‖W + ΔW‖`` per output row (exactly 1 for rows without a magnitude), the norm detached."""
        norm = row_norm(w + delta.detach()).detach()
        if self.index is None:
            return self.magnitude / norm
        return torch.ones_like(norm).index_copy(0, self.index, self.magnitude / norm[self.index])

    def forward(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        s = self.geometry.channels_view(self.scale(w, self.lora.delta_weight()), y.ndim)
        base = y if b is None else y - self.geometry.channels_view(b, y.ndim)
        return y + (s - 1) * base + s * self.lora(x)  # at init: s = 1 and lora(x) = 0, so exactly y

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W <- s ⊙ (W + ΔW)``, ``b <- s ⊙ b + (1 - s) ⊙ b₀`` (``s`` from the frozen ``W₀``)."""
        if tap != "replace":
            raise NotMergeable(f"it does not replace {layer.path}'s output")
        w0, b0 = original(layer)
        delta = cast(torch.Tensor, f64(self.lora.delta_weight()))
        norm = row_norm(w0 + delta)
        m = cast(torch.Tensor, f64(self.magnitude))
        s = m / norm if self.index is None else torch.ones_like(norm).index_copy(0, self.index, m / norm[self.index])
        layer.add_input_map(delta, None)
        layer.scale_shift(s, None if b0 is None else (1 - s) * b0)


@register
class DoraKind(TunerKind):
    kind = "dora"
    Options = DoraOptions
    summary = "W' = m (W + dW) / norm(W + dW) per output row, dW = (alpha/r) B A; Liu et al. 2024 (DoRA)"
    placements = ("parallel",)
    taps = {"parallel": ("input",)}  # LoRA reads the layer's own input; the magnitude rescales its output
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        weight_layer(self, site, conv=True)
        if self.options.slices and not is_fused_qkv(site):
            raise self.fail(
                site,
                f"`slices` need a fused qkv Linear (named *qkv*, out = 3 x in); this is a {site.type}",
                hint="drop `slices` for this rule, or select the attention's qkv layer",
            )

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        base = cast(BaseLayer, site.module)  # check() made sure
        index = None
        if self.options.slices:
            part = cast(nn.Linear, base).out_features // 3
            thirds = [i for i, s in enumerate(SLICES) if s in self.options.slices]
            index = torch.cat([torch.arange(i * part, (i + 1) * part) for i in thirds])
        w, b = frozen_weight_bias(site)
        module = Dora(base, self.options, index)
        return [Attachment(site, module, "replace", (Tap("output"), Tap("input"), w, b))]

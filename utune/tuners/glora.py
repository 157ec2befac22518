"""GLoRA: ``W' = W + W ⊙ A + B``, ``b' = b + b ⊙ D + E + W C`` (Chavan et al. 2023, arXiv 2306.07967).

One fixed configuration of the paper's per-layer search space (the evolutionary search is not done): each
support tensor is a path of its own form, chosen per rule, as in PEFT (``config_A_B``, ``config_C``,
``config_D_E``) and the official code: ``A``, ``B`` (out x in): ``lora`` (``X_d X_u``, rank r), ``vector``
(out x 1), ``constant`` (a scalar) or ``none``; ``C`` (in x 1, the "prompt" through the frozen weight):
``lora``, ``vector`` or ``none``; ``D``, ``E`` (out): ``vector``, ``constant`` or ``none``. Every path starts
at zero (a LoRA path's ``X_d``; ``X_u`` Kaiming-uniform), so the tuned model is the base exactly. The tuner
reads the frozen ``W``, ``b`` and adds ``(W ⊙ A + B) x + b ⊙ D + E + W C`` (one extra matmul, like PEFT's and
the official forward). A layer without a bias gets no C, D, E (PEFT's choice; such terms would need a bias
to fold into). Mergeable: ``W += W ⊙ A + B``, ``b += b ⊙ D + E + W C``.

Linear layers only (the paper, its code and PEFT define GLoRA on Linear layers).

Deliberate differences from the official code (Arnav0400/ViT-Slim, ``GLoRA/layer.py``), none of them in the
function of equal tensors: a lora path's ``X_u`` is Kaiming-uniform (``a = sqrt(5)``, LoRA's and PEFT's init)
where the official supernet draws it xavier-uniform (both start the path at zero, ``X_d`` being zero, so only
the scale of the first updates differs); and a layer without a bias gets no ``C``, ``D``, ``E``, where the
official layer adds ``E + W C`` as its bias (PEFT's choice; ViT Linears all have biases).
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners._layer import frozen_weight_bias, original, weight_layer
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable
from utune.tuners.registry import register

PathForm = Literal["lora", "vector", "constant", "none"]


class GloraOptions(TunerOptions):
    rank: int = Field(default=4, gt=0, description="r of every lora path (the official supernet's 4)")
    a_b: PathForm = Field(default="lora", description="form of A (scales W) and B (adds to W)")
    c: Literal["lora", "vector", "none"] = Field(default="lora", description="form of C (bias term W C)")
    d_e: Literal["vector", "constant", "none"] = Field(default="constant", description="form of D (scales b), E")


class GloraPath(nn.Module):
    """One support tensor of GLoRA, zero at init: ``X_d X_u`` (lora), a vector, a scalar, or nothing."""

    def __init__(self, form: str, rows: int, cols: int, rank: int, column: bool = True) -> None:
        super().__init__()
        self.form = form
        if form == "lora":
            self.Xd = nn.Parameter(torch.zeros(rows, rank))  # zero: the path is 0 at init
            self.Xu = nn.Parameter(torch.empty(rank, cols))
            nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
        elif form == "vector":
            self.X = nn.Parameter(torch.zeros(rows, 1) if column else torch.zeros(rows))
        elif form == "constant":
            self.X = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor | None:
        if self.form == "lora":
            return self.Xd @ self.Xu
        if self.form == "vector":
            return self.X
        return self.X[0] if self.form == "constant" else None


class Glora(nn.Module):
    """``(W ⊙ A + B) x + (b ⊙ D + E + W C)`` for one Linear (PEFT's ``glora_A`` .. ``glora_E`` paths)."""

    def __init__(self, base: nn.Linear, opts: GloraOptions) -> None:
        super().__init__()
        out, inp, r = base.out_features, base.in_features, opts.rank
        has_bias = base.bias is not None
        self.glora_A = GloraPath(opts.a_b, out, inp, r)
        self.glora_B = GloraPath(opts.a_b, out, inp, r)
        self.glora_C = GloraPath(opts.c if has_bias else "none", inp, 1, r)
        self.glora_D = GloraPath(opts.d_e if has_bias else "none", out, 1, r, column=False)
        self.glora_E = GloraPath(opts.d_e if has_bias else "none", out, 1, r, column=False)

    def deltas(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W ⊙ A + B, b ⊙ D + E + W C)`` from the frozen ``w``, ``b`` (no bias: None)."""
        paths = (self.glora_A, self.glora_B, self.glora_C, self.glora_D, self.glora_E)
        a, bb, c, d, e = (v if v is None else v.to(w.dtype) for v in (p() for p in paths))  # float64 to fold
        dw = torch.zeros_like(w) if a is None else w * a
        dw = dw if bb is None else dw + bb
        if b is None:
            return dw, None
        db = torch.zeros_like(b) if d is None else b * d
        db = db if e is None else db + e
        return dw, db if c is None else db + (w @ c).squeeze(-1)

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        dw, db = self.deltas(w, b)
        return F.linear(x, dw, db)

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W += W₀ ⊙ A + B``, ``b += b₀ ⊙ D + E + W₀ C`` (W₀, b₀: the frozen tensors it reads)."""
        if tap != "input":
            raise NotMergeable(f"it does not read the input of {layer.path}")
        w0, b0 = original(layer)
        dw, db = self.deltas(w0, b0)
        layer.add_input_map(dw.detach(), None if db is None else db.detach())


@register
class GloraKind(TunerKind):
    kind = "glora"
    Options = GloraOptions
    summary = "W' = W + W*A + B, b' = b + b*D + E + W C (one fixed config) on a Linear; Chavan et al. 2023 (GLoRA)"
    placements = ("parallel",)
    taps = {"parallel": ("input",)}  # reads the layer's own input (and its frozen W, b): it folds into them
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        weight_layer(self, site, conv=False, why_not_conv="GLoRA is defined on Linear layers (the paper, PEFT)")

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        w, b = frozen_weight_bias(site)
        module = Glora(cast(nn.Linear, site.module), self.options)  # check() made sure
        return [Attachment(site, module, "add", (Tap("input"), w, b))]

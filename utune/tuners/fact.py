"""FacT: the weight increments of every selected layer as one factorised tensor, ``ΔW_k = s · V Σ_k U``.

Jie & Deng 2023, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer" (AAAI, arXiv
2212.03145). Each selected Linear (ViT: q, k, v, o, fc1, fc2 of every block) is cut into d x d slices (d = the
model width: qkv is 3 output slices, fc1 4, fc2 4 input slices), so the increments of a whole ViT-B form one
768 x 768 x 144 tensor. It is factorised with ``U`` (d -> r) and ``V`` (r -> d) *shared by every slice of every
layer* (one tensor each for the whole rule: :mod:`utune.graph.share`) and a small core per slice:

- ``form: tt`` (tensor-train): each slice has its own trainable r x r core ``Σ_k``; 2dr + 12Lr² parameters;
- ``form: tk`` (Tucker): ``Σ_k = C ×₃ P_k`` with a shared r x r x r tensor ``C`` and an r-vector ``P_k`` per
  slice; 2dr + r³ + 12Lr parameters.

A layer's output gains ``s · V Σ U x`` per slice (dropout on the core's output in training, 0.1 in the
official code); ``V`` starts at zero, so the model starts as the base. Mergeable: ``W += s · [V Σ_k U]``, the
same shared ``U, V`` folding into every layer.

FacT-TK differs from the official code (JieShibo/PETL-ViT, ``FacT/fact_tk.py``) in the MLP, deliberately:
utune reads every slice's core the same way, ``Σ_k[x, y] = Σ_c C[x, y, c] P_k[c]`` with ``x`` on ``U``'s side
and ``y`` on ``V``'s (the paper's slice-aligned Tucker form), as the official code does for q, k, v and o. The
official fc1 and fc2 instead reshape their four slices' cores ``(r, r, 4)`` to ``(r, 4r)`` and read the
flattened ``(y, slice)`` index as ``(slice', y')``, mixing core entries across slices; and fc2 reads its cores
transposed, its first two modes swapped (``x`` on ``V``'s side, the mixed index on ``U``'s). Same parameter
count, same function class, not the same function of equal tensors on fc1 and fc2 (attention agrees exactly).
Any traceable model's Linear layers whose widths are multiples of one d share the factors (timm and
torchvision ViTs; Swin or ConvNeXt stages of widths d, 2d, 4d... slice into d x d too); a layer whose width is
not a multiple of d is refused, with the hint to give it its own rule.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.registry import register


class FactOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout",)

    form: Literal["tt", "tk"] = Field(default="tt", description="tt: a core per slice; tk: a shared core C and P_k")
    rank: int = Field(default=8, gt=0, description="r: rank of the shared U, V (FacT's CIFAR config: tt 8, tk 32)")
    scale: float = Field(default=1.0, description="s: a fixed scale of every increment (tt 1.0, tk 0.1 on CIFAR)")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout on the core's output in training (0.1)")
    width: int | None = Field(
        default=None, gt=0, description="d: the slice size U and V act on; null: the smallest in/out of the layers"
    )


class Fact(nn.Module):
    """``ΔW`` of one Linear of ``a·d`` inputs and ``b·d`` outputs: ``a x b`` slices ``s · V Σ_ij U``."""

    def __init__(self, a: int, b: int, d: int, opts: FactOptions, slices: int) -> None:
        super().__init__()
        r = opts.rank
        self.a, self.b, self.scale, self.form = a, b, opts.scale, opts.form
        self.U, self.V = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)  # shared by the rule's sites
        nn.init.zeros_(self.V.weight)
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()
        if opts.form == "tt":  # one r x r core per slice, nn.Linear's default bound (fan-in a·r, as official)
            bound = 1 / math.sqrt(a * r)
            self.cores = nn.Parameter(torch.empty(a, b, r, r).uniform_(-bound, bound))
        else:  # Tucker: C (r, r, r) shared, P_k per slice; xavier bounds of the official (r,r,r) and (r, 144)
            self.C = nn.Parameter(torch.empty(r, r, r).uniform_(-1, 1) * math.sqrt(3 / (r * r)))
            self.P = nn.Parameter(torch.empty(r, a, b).uniform_(-1, 1) * math.sqrt(6 / (r + slices)))

    def kernel(self) -> torch.Tensor:
        """The cores as ``(a, b, r, r)``: slice (input j, output i) maps ``u`` to ``u @ kernel[j, i]``."""
        if self.form == "tt":
            return self.cores
        return torch.einsum("xyc,cji->jixy", self.C, self.P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.U(x.unflatten(-1, (self.a, -1)))  # (..., a, r)
        h = self.dropout(torch.einsum("...jx,jixy->...iy", u, self.kernel()))  # (..., b, r)
        return self.V(h).flatten(-2) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``s · [V Σ_ij U]`` as the Linear's ``(b·d, a·d)`` weight change."""
        v, u, k = (cast(torch.Tensor, f64(t)) for t in (self.V.weight, self.U.weight, self.kernel()))
        blocks = torch.einsum("py,jixy,xq->ipjq", v, k, u)  # (b, d, a, d)
        return blocks.reshape(self.b * v.shape[0], self.a * u.shape[1]) * self.scale

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W' = W + ΔW`` (the shared U and V fold into every layer through its own module)."""
        if tap != "input":
            raise NotMergeable(f"it does not read the input of {layer.path}")
        layer.add_input_map(self.delta_weight(), None)


@register
class FactKind(TunerKind):
    kind = "fact"
    Options = FactOptions
    summary = "y = W x + s*V Sigma_k U x, U and V shared by all layers (FacT-TT/TK, Jie & Deng 2023)"
    placements = ("parallel",)
    taps = {"parallel": ("input",)}  # an increment of the layer's own weight
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        if site.op != "module" or not isinstance(site.module, nn.Linear):
            raise self.fail(
                site,
                f"it is a {site.type} ({site.op}); FacT factorises Linear weights",
                hint="select the Linear layers, e.g. at: {path: 'blocks.*.**', type: Linear}",
            )

    def plan_selection(self, sites: list[Site], ctx: PlanContext) -> list[Attachment]:
        """Every site's slices share one U, V (and, for tk, C); the init bounds see the whole tensor."""
        opts: FactOptions = self.options
        dims = [(cast(nn.Linear, s.module).in_features, cast(nn.Linear, s.module).out_features) for s in sites]
        d = opts.width or min(min(io) for io in dims)
        for site, (n_in, n_out) in zip(sites, dims, strict=True):
            if n_in % d or n_out % d:
                raise self.fail(
                    site,
                    f"its {n_in} inputs and {n_out} outputs are not multiples of the slice size d={d}",
                    hint="FacT shares U, V of one width: select layers of one model width (one rule per width)",
                )
        slices = sum((n_in // d) * (n_out // d) for n_in, n_out in dims)
        shared = ("U.weight", "V.weight") + (("C",) if opts.form == "tk" else ())
        return [
            Attachment(site, Fact(n_in // d, n_out // d, d, opts, slices), "add", (Tap("input"),), shared=shared)
            for site, (n_in, n_out) in zip(sites, dims, strict=True)
        ]

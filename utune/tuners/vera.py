"""VeRA: ``y = W x + λ_b ⊙ B (λ_d ⊙ A x)`` (Kopiczko et al. 2024, arXiv 2310.11454).

``A`` (r x in) and ``B`` (out x r) are frozen random matrices, one pair for the whole rule: they are sized for
the largest selected layer and each layer uses their leading block (``A[:, :in]``, ``B[:out]``), as in PEFT.
They are drawn once from ``seed`` (PEFT's ``projection_prng_key``: Kaiming-uniform, A then B, from one CPU
generator, so the same seed gives PEFT's matrices) and shared through the engine (``Attachment.shared``):
one tensor each, frozen buffers, stored once. Only the per-layer vectors train: ``λ_d`` (r, init
``d_initial``) and ``λ_b`` (out, init 0, so the tuned model is the base exactly). ``slices: [q, v]`` on a
fused qkv Linear gives the q and v thirds their own ``λ_d, λ_b`` (each a layer of ``out/3`` in VeRA's sense),
the k third none. Mergeable: ``W += (λ_b ⊙ B)(λ_d ⊙ A)``.

Linear layers only (the paper and PEFT define VeRA on Linear layers).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners._layer import weight_layer
from utune.tuners.base import TunerKind, TunerOptions, is_fused_qkv
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.lora import SLICES
from utune.tuners.registry import register


class VeraOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout",)

    rank: int = Field(default=256, gt=0, description="r of the shared frozen A (r x in) and B (out x r)")
    d_initial: float = Field(default=0.1, description="initial value of every λ_d (the paper's 0.1)")
    seed: int = Field(default=0, ge=0, description="seed of the frozen A and B (PEFT's projection_prng_key)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the input of A during training")
    slices: list[Literal["q", "k", "v"]] | None = Field(
        default=None, description="fused qkv only: the output thirds that get λ_d, λ_b, e.g. [q, v]; null: all"
    )


def projections(rank: int, features: int, out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen ``A`` (rank x features) then ``B`` (out x rank), Kaiming-uniform from one seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)

    def draw(rows: int, fan_in: int) -> torch.Tensor:
        bound = math.sqrt(6.0 / fan_in)  # gain sqrt(2) (ReLU), uniform: sqrt(3) * gain / sqrt(fan_in)
        return torch.empty(rows, fan_in).uniform_(-bound, bound, generator=gen)

    return draw(rank, features), draw(out, rank)


class Vera(nn.Module):
    """One layer's ``λ_b ⊙ B (λ_d ⊙ A x)`` per output part (one part, or the qkv thirds ``slices`` names)."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, base: nn.Linear, opts: VeraOptions, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.slices = list(opts.slices) if opts.slices else None
        self.features = base.in_features
        self.part = base.out_features // 3 if self.slices else base.out_features
        parts = len(self.slices) if self.slices else 1
        self.register_buffer("vera_A", a)  # shared by every site of the rule (Attachment.shared)
        self.register_buffer("vera_B", b)
        self.vera_lambda_d = nn.Parameter(torch.full((parts, opts.rank), float(opts.d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(parts, self.part))  # zero: the base exactly at init
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.vera_A[:, : self.features])
        b = self.vera_B[: self.part]
        outs = [lb * F.linear(ld * h, b) for ld, lb in zip(self.vera_lambda_d, self.vera_lambda_b, strict=True)]
        if self.slices is None:
            return outs[0]
        zero = x.new_zeros(*x.shape[:-1], self.part)
        by_name = dict(zip(self.slices, outs, strict=True))
        return torch.cat([by_name.get(s, zero) for s in SLICES], dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """``(λ_b ⊙ B)(λ_d ⊙ A)`` per part, stacked with zero blocks for the thirds without vectors."""
        a, b = self.vera_A[:, : self.features], self.vera_B[: self.part]
        vectors = zip(self.vera_lambda_d, self.vera_lambda_b, strict=True)
        parts = [(lb[:, None] * b) @ (ld[:, None] * a) for ld, lb in vectors]
        if self.slices is None:
            return parts[0]
        by_name = dict(zip(self.slices, parts, strict=True))
        return torch.cat([by_name.get(s, torch.zeros_like(parts[0])) for s in SLICES])

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W' = W + (λ_b ⊙ B)(λ_d ⊙ A)``."""
        if tap != "input":
            raise NotMergeable(f"it does not read the input of {layer.path}")
        layer.add_input_map(cast(torch.Tensor, f64(self.delta_weight())), None)


@register
class VeraKind(TunerKind):
    kind = "vera"
    Options = VeraOptions
    summary = "y = W x + l_b * B (l_d * A x), A, B frozen random, shared by all layers; Kopiczko et al. 2024 (VeRA)"
    placements = ("parallel",)
    taps = {"parallel": ("input",)}  # reads the layer's own input: it folds into W
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        weight_layer(self, site, conv=False, why_not_conv="VeRA is defined on Linear layers (the paper, PEFT)")
        if self.options.slices and not is_fused_qkv(site):
            raise self.fail(
                site,
                f"`slices` need a fused qkv Linear (named *qkv*, out = 3 x in); this is a {site.type}",
                hint="drop `slices` for this rule, or select the attention's qkv layer",
            )

    def plan_selection(self, sites: list[Site], ctx: PlanContext) -> list[Attachment]:
        """One frozen pair for the rule, sized for its largest layer; every site reads its leading block."""
        layers = [cast(nn.Linear, s.module) for s in sites]  # check() made sure
        thirds = 3 if self.options.slices else 1
        features = max(m.in_features for m in layers)
        out = max(m.out_features // thirds for m in layers)
        a, b = projections(self.options.rank, features, out, self.options.seed)
        return [
            Attachment(site, Vera(layer, self.options, a, b), "add", (Tap("input"),), shared=("vera_A", "vera_B"))
            for site, layer in zip(sites, layers, strict=True)
        ]

"""BOFT: ``y = s ⊙ (W (R x)) + b``, ``R = M_m ··· M_1`` butterfly factors (Liu et al. 2024, arXiv 2311.06243).

Each factor ``M_i = P_i blockdiag(R_i1 .. R_iD) P_iᵀ`` is block-diagonal orthogonal (``D`` blocks of size
``b``, ``D · b = in``) between a butterfly permutation ``P_i`` (``P_1 = I``; factor i interleaves half-blocks
across groups of ``2^(i-1)`` blocks), so m factors mix what m block-diagonal OFTs alone cannot. Each block is
the exact Cayley transform of ``Q = (A - Aᵀ)/2`` of a full ``b x b`` parameter ``A`` (PEFT's ``boft_R``, shape
``(m, D, b, b)``: the count includes the ``b(b+1)/2`` entries per block that the skew part ignores), and a
learned output scale ``s`` (``boft_s``, one per output) rescales ``W R x``. ``A = 0`` and ``s = 1`` at init: the
base exactly. The rotation acts on the layer's input (join ``replace_input``, as OFT), the scale on its output
without the bias (a second attachment, role ``scale``). Mergeable: ``W' = s ⊙ (W Rᵀ)``, ``b`` unchanged.

Linear layers only, for OFT's reason (see ``oft``). On a CPU PEFT 0.21 silently uses one factor (its butterfly
needs a CUDA extension); utune computes every factor on any device.
"""

from __future__ import annotations

from typing import cast

import torch
from pydantic import Field, model_validator
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners._layer import frozen_weight_bias, original, weight_layer
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.oft import CONV_WHY, block_sizes, blockwise, cayley
from utune.tuners.registry import register


class BoftOptions(TunerOptions):
    block_size: int | None = Field(default=None, gt=0, description="b, the size of each block (null: 4, PEFT's)")
    blocks: int | None = Field(default=None, gt=0, description="D, blocks per factor (in = D·b); instead of b")
    butterfly_factor: int = Field(default=1, ge=1, description="m, butterfly factors (1: one block-diagonal OFT)")

    @model_validator(mode="after")
    def _one_size(self) -> BoftOptions:
        if self.block_size is not None and self.blocks is not None:
            raise ValueError("set block_size or blocks, not both (in = blocks x block_size)")
        return self


def butterfly_perm(n: int, blocks: int, half: int) -> torch.Tensor:
    """Within each of ``blocks`` equal parts of ``range(n)``: its chunks of ``half`` in even-then-odd order."""
    size = n // blocks
    chunks = size // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    return torch.cat([start + within for start in range(0, n, size)])


class BoftRotation(nn.Module):
    """``x -> x · M_m ··· M_1`` in PEFT's row-vector form (``M_i = P_i · blockdiag(cayley) · P_iᵀ``)."""

    perm: torch.Tensor
    inverse: torch.Tensor

    def __init__(self, features: int, blocks: int, size: int, factors: int) -> None:
        super().__init__()
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, size, size))  # Q = 0: every block is I
        perms = [butterfly_perm(features, blocks // 2**i, size // 2) if factors > 1 else torch.arange(features)
                 for i in range(factors)]  # fmt: skip
        perm = torch.stack(perms)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", torch.argsort(perm, dim=1), persistent=False)

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks ``(m, D, b, b)``."""
        a = self.boft_R
        return cayley(0.5 * (a - a.transpose(-1, -2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rots = self.rotations()
        for i in reversed(range(rots.shape[0])):  # x M_m first: the product is M_m ··· M_1
            x = blockwise(x[..., self.inverse[i]], rots[i])[..., self.perm[i]]  # x P, blocks, then Pᵀ
        return x

    def matrix(self) -> torch.Tensor:
        """``M_m ··· M_1`` as one ``in x in`` matrix (float64)."""
        rots = cast(torch.Tensor, f64(self.rotations()))
        eye = torch.eye(self.perm.shape[1], dtype=torch.float64)
        out = eye
        for i in range(rots.shape[0]):
            p = eye[:, self.perm[i]].T  # P[k, perm[k]] = 1
            out = p @ torch.block_diag(*rots[i]) @ p.T @ out
        return out

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: the layer reads ``x M``, so ``W' = W Mᵀ`` (added as ``W Mᵀ - W``)."""
        if tap != "input_map":
            raise NotMergeable(f"it does not rotate what {layer.path} reads")
        assert layer.weight is not None  # a Linear (the kind takes nothing else)
        layer.add_input_map(layer.weight @ self.matrix().T - layer.weight, None)


class BoftScale(nn.Module):
    """``y -> y + (s - 1) ⊙ (y - b)``: ``s ⊙ W x + b`` on the layer's output (``boft_s``, PEFT's ``(out, 1)``)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.boft_s = nn.Parameter(torch.ones(out, 1))

    def forward(self, y: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        s = self.boft_s[:, 0]
        return y + (s - 1) * (y if b is None else y - b)  # s = 1 at init: exactly y

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W' = s ⊙ W``, ``b' = s ⊙ b + (1 - s) ⊙ b₀`` (b₀ the frozen bias it subtracted)."""
        if tap != "replace":
            raise NotMergeable(f"it does not rescale {layer.path}'s output")
        s = cast(torch.Tensor, f64(self.boft_s))[:, 0]
        _, b0 = original(layer)
        layer.scale_shift(s, None if b0 is None else (1 - s) * b0)


@register
class BoftKind(TunerKind):
    kind = "boft"
    Options = BoftOptions
    summary = "y = s * W (M_m..M_1 x) + b, butterfly block-orthogonal (Cayley), on a Linear; Liu et al. 2024 (BOFT)"
    placements = ("sequential",)
    default_placement = "sequential"
    taps = {"sequential": ("input",)}  # the rotation of the layer's own input, which the layer then reads
    mergeable = True

    def sizes(self, site: Site) -> tuple[int, int]:
        m = self.options.butterfly_factor
        blocks, size = block_sizes(self, site, self.options.block_size, self.options.blocks, 4)  # 4: PEFT's default
        if m > 1 and (size % 2 or blocks % 2 ** (m - 1)):
            raise self.fail(
                site,
                f"{m} butterfly factors need an even block size and a number of blocks divisible by {2 ** (m - 1)} "
                f"(here {blocks} blocks of {size})",
                hint="lower butterfly_factor, or pick a block_size giving more blocks",
            )
        return blocks, size

    def check(self, site: Site, ctx: PlanContext) -> None:
        weight_layer(self, site, conv=False, why_not_conv=CONV_WHY.replace("OFT's", "BOFT's"))
        self.sizes(site)

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        blocks, size = self.sizes(site)
        layer = cast(nn.Linear, site.module)
        rotation = BoftRotation(layer.in_features, blocks, size, self.options.butterfly_factor)
        _, bias = frozen_weight_bias(site)
        return [
            Attachment(site, rotation, "replace_input", (Tap("input"),)),
            Attachment(site, BoftScale(layer.out_features), "replace", (Tap("output"), bias), role="scale"),
        ]

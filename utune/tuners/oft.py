"""OFT: ``y = W (R x) + b`` with ``R`` block-diagonal orthogonal (Qiu et al. 2023, arXiv 2306.07280).

Each of the ``r`` blocks (``block_size`` b, ``r · b = in``) is the Cayley transform of a skew-symmetric
``Q`` (its ``b(b-1)/2`` upper-triangle entries are the parameters, PEFT's ``oft_R``): exactly
``R = (I - Q)(I + Q)⁻¹`` (PEFT's ``use_cayley_neumann: false``), or, with ``neumann_terms: n``, PEFT's
default: the n-term Neumann series of ``(I + Q)(I - Q)⁻¹`` (an approximation, not exactly orthogonal).
``Q = 0`` at init, so ``R = I`` and the tuned model is the base exactly. The rotation acts on the layer's
input (``x -> x R`` in PEFT's row-vector form), which the layer then reads: a ``sequential`` tuner placed
before the op (join ``replace_input``); no second matmul with ``W``. ``block_share`` uses one block for all.
Mergeable: ``W' = W Rᵀ`` (``x R`` read by ``W``). COFT (PEFT's ``coft``) and block dropout are not offered.

Linear layers only: PEFT 0.21 applies OFT to a Conv2d by rotating unfolded input patches and summing them
back (overlap-add), which is not the convolution of its own merged weight (nor the identity at init for
k > 1); rotating a convolution's flattened filters instead needs the weight itself in the forward pass.
"""

from __future__ import annotations

from typing import cast

import torch
from pydantic import Field, model_validator
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners._layer import weight_layer
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.registry import register

CONV_WHY = "OFT's rotation of a convolution's input patches does not fold into its weight (see `utune tuners`)"


def cayley(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """Orthogonal ``(I - Q)(I + Q)⁻¹`` of a batch of skew-symmetric ``Q`` (..., b, b); with ``neumann_terms`` n,
    PEFT's truncated Neumann series of ``(I + Q)(I - Q)⁻¹`` instead (n = 5: ``I + 2Q + 2Q² + 2Q³ + Q⁴``)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if neumann_terms < 2:
        return eye.clone()
    out = eye + 2 * q
    if neumann_terms == 2:
        return out
    power = q @ q
    out = out + 2 * power
    for _ in range(3, neumann_terms - 1):
        power = power @ q
        out = out + 2 * power
    return out + power @ q


def blockwise(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` (..., n·b) times the block-diagonal matrix of ``blocks`` (n, b, b), row-vector form ``x R``."""
    n, b, _ = blocks.shape
    return torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], n, b), blocks).reshape(x.shape)


def block_sizes(
    kind: TunerKind, site: Site, block_size: int | None, blocks: int | None, default: int
) -> tuple[int, int]:
    """``(number of blocks, block size)`` for the site's Linear; SelectionError naming the divisors near it."""
    features = cast(nn.Linear, site.module).in_features
    size = features // blocks if blocks else (block_size or default)
    n = features // size if size else 0
    if size > 0 and n * size == features and not (blocks and blocks > features):
        return n, size
    want = blocks or size
    close = sorted((d for d in range(1, features + 1) if features % d == 0), key=lambda d: abs(d - want))[:4]
    what = f"blocks: {blocks}" if blocks else f"block_size: {size}"
    raise kind.fail(
        site,
        f"{what} does not divide its {features} input features (divisors near it: {sorted(close)})",
        hint="pick a block_size (or blocks) that divides the input of every selected layer",
    )


class OftOptions(TunerOptions):
    block_size: int | None = Field(default=None, gt=0, description="b, the size of each block (null: 32, PEFT's)")
    blocks: int | None = Field(default=None, gt=0, description="r, the number of blocks (in = r·b); instead of b")
    block_share: bool = Field(default=False, description="one rotation block shared by all blocks of a layer")
    neumann_terms: int | None = Field(
        default=None, ge=2, description="null: the exact Cayley transform; n: PEFT's default Neumann series (5)"
    )

    @model_validator(mode="after")
    def _one_size(self) -> OftOptions:
        if self.block_size is not None and self.blocks is not None:
            raise ValueError("set block_size or blocks, not both (in = blocks x block_size)")
        return self


class OftRotation(nn.Module):
    """``x -> x · blockdiag(R_1 .. R_r)``, each ``R_i`` the Cayley transform of a skew ``Q_i`` (``oft_R``)."""

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, features: int, blocks: int, size: int, share: bool, neumann_terms: int | None) -> None:
        super().__init__()
        self.blocks, self.size, self.neumann_terms = blocks, size, neumann_terms
        self.oft_R = nn.Parameter(torch.zeros(1 if share else blocks, size * (size - 1) // 2))  # Q = 0: R = I
        rows, cols = torch.triu_indices(size, size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> torch.Tensor:
        """The ``r`` orthogonal blocks ``(r, b, b)``."""
        q = self.oft_R.new_zeros(self.oft_R.shape[0], self.size, self.size)
        q[:, self.rows, self.cols] = self.oft_R
        r = cayley(q - q.transpose(1, 2), self.neumann_terms)
        return r.expand(self.blocks, -1, -1) if r.shape[0] != self.blocks else r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blockwise(x, self.rotations())

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: the layer reads ``x R``, so ``W' = W Rᵀ`` (added as ``W Rᵀ - W``)."""
        if tap != "input_map":
            raise NotMergeable(f"it does not rotate what {layer.path} reads")
        r = torch.block_diag(*cast(torch.Tensor, f64(self.rotations())))
        assert layer.weight is not None  # a Linear (the kind takes nothing else)
        layer.add_input_map(layer.weight @ r.T - layer.weight, None)


@register
class OftKind(TunerKind):
    kind = "oft"
    Options = OftOptions
    summary = "y = W (R x) + b, R block-diagonal orthogonal (Cayley), on a Linear; Qiu et al. 2023 (OFT)"
    placements = ("sequential",)
    default_placement = "sequential"
    taps = {"sequential": ("input",)}  # the rotation of the layer's own input, which the layer then reads
    mergeable = True
    default_block_size = 32  # PEFT's oft_block_size

    def sizes(self, site: Site) -> tuple[int, int]:
        return block_sizes(self, site, self.options.block_size, self.options.blocks, self.default_block_size)

    def check(self, site: Site, ctx: PlanContext) -> None:
        weight_layer(self, site, conv=False, why_not_conv=CONV_WHY)
        self.sizes(site)

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        n, size = self.sizes(site)
        features = cast(nn.Linear, site.module).in_features
        rotation = OftRotation(features, n, size, self.options.block_share, self.options.neumann_terms)
        return [Attachment(site, rotation, "replace_input", (Tap("input"),))]

"""LoKr: ``y = W x + ΔW x``, ``ΔW = (alpha/r) · W1 ⊗ W2`` (Kronecker product: KronA, Edalati et al. 2022,
arXiv 2212.10650; LoKr as LyCORIS and PEFT define it, arXiv 2309.14859).

With ``out = a·b`` and ``in = c·d`` (PEFT's ``factorization``: the divisor pair nearest the square root, or
``decompose_factor`` as the first factor when it divides), ``W1`` is ``a x c`` and ``W2`` is ``b x d`` (a Conv2d's
``W2`` also carries the kernel: ``b x d x k x k``, and ``in`` is ``in/groups``). ``W2`` is low-rank
(``W2a W2b``, rank r) when ``r < max(b, d) / 2``, else full; ``W1`` is low-rank only with ``decompose_both``
and ``r < max(a, c) / 2``. As in PEFT, ``W1`` (or ``W1a``) starts at zero and the rest Kaiming-uniform, so
``ΔW = 0`` at init. ``ΔW x`` runs as the layer runs its own weight (grouped convolutions included).
Mergeable: ``W += ΔW``. Not offered: PEFT's rank/module dropout and its CP-decomposed Conv2d ``W2``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch import nn

from utune.tuners._layer import BaseLayer, DeltaWeightKind, Geometry, WeightDelta
from utune.tuners.base import TunerOptions
from utune.tuners.registry import register


class LokrOptions(TunerOptions):
    rank: int = Field(default=8, gt=0, description="r of the low-rank W2 (and W1 with decompose_both)")
    alpha: float | None = Field(default=None, gt=0, description="scaling = alpha / r; null: alpha = r (scaling 1)")
    decompose_factor: int = Field(
        default=-1, description="first factor of out and in when it divides them; -1: nearest the square root"
    )
    decompose_both: bool = Field(default=False, description="also make W1 low-rank when r < max(its dims) / 2")

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("decompose_factor is -1 (near the square root) or a positive factor")
        return v


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dim``: ``(factor, dim / factor)`` when ``factor`` divides ``dim``; else the
    divisor pair nearest the square root (``m <= n``) whose smaller member does not pass ``factor``."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    for d in range(2, dim + 1):  # divisors upwards; the pair crosses the square root, then stop
        if dim % d:
            continue
        if d > limit or m >= n:
            break
        m, n = d, dim // d
    return min(m, n), max(m, n)


def _param(*shape: int, zero: bool = False) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(*shape))
    if not zero:
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


def _product(a: nn.Parameter | None, b: nn.Parameter | None) -> torch.Tensor:
    assert a is not None and b is not None  # a factor is either full or both of its low-rank halves
    return a @ b


class Lokr(WeightDelta):
    """``ΔW x`` with ``ΔW = (alpha/r) W1 ⊗ W2`` (PEFT's tensor names and shapes; absent factors are None)."""

    lokr_w1: nn.Parameter | None
    lokr_w1_a: nn.Parameter | None
    lokr_w1_b: nn.Parameter | None
    lokr_w2: nn.Parameter | None
    lokr_w2_a: nn.Parameter | None
    lokr_w2_b: nn.Parameter | None

    def __init__(self, base: BaseLayer, opts: LokrOptions) -> None:
        super().__init__()
        self.geometry = Geometry(base)
        shape, r = self.geometry.shape, opts.rank
        self.scaling = (opts.alpha if opts.alpha is not None else r) / r
        a, b = factorization(shape[0], opts.decompose_factor)
        c, d = factorization(shape[1], opts.decompose_factor)
        kernel = shape[2:]
        full_w1 = not (opts.decompose_both and r < max(a, c) / 2)
        full_w2 = not (r < max(b, d) / 2)
        self.lokr_w1 = _param(a, c, zero=True) if full_w1 else None
        self.lokr_w1_a = None if full_w1 else _param(a, r, zero=True)  # zero: ΔW = 0 at init
        self.lokr_w1_b = None if full_w1 else _param(r, c)
        self.lokr_w2 = _param(b, d, *kernel) if full_w2 else None
        self.lokr_w2_a = None if full_w2 else _param(b, r)
        self.lokr_w2_b = None if full_w2 else _param(r, d * math.prod(kernel))

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else _product(self.lokr_w1_a, self.lokr_w1_b)
        w2 = self.lokr_w2 if self.lokr_w2 is not None else _product(self.lokr_w2_a, self.lokr_w2_b)
        if w2.ndim == 4:  # a full conv W2 (b, d, k, k): W1 gets unit kernel dims so kron keeps the kernel
            w1 = w1[:, :, None, None]
        dw = torch.kron(w1, w2.contiguous())
        return (dw if self.scaling == 1.0 else dw * self.scaling).reshape(self.geometry.shape)


@register
class LokrKind(DeltaWeightKind):
    kind = "lokr"
    module = Lokr
    Options = LokrOptions
    summary = "y = W x + (alpha/r) (W1 kron W2) x on a Linear/Conv2d; LoKr (KronA 2022, LyCORIS)"

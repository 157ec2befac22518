"""Prefix tuning and U-Tuning's parallel P-Prefix.

- ``placement: concat`` (Li & Liang 2021; VPT/NOAH's ViT form): learned ``K_pre, V_pre`` of length L are
  concatenated to an attention's keys and values (``scaled_dot_product_attention`` or the explicit
  ``softmax(q k^T) v``; an sdpa ``attn_mask`` is padded so the prefix is visible). 2·L·C parameters a
  layer. Not the identity at init (as in the papers).
- ``placement: parallel`` (U-Tuning P-Prefix, Jiang et al. 2023): ``x' = OP(x) + s ⊙ Attn(Q, K_pre, V_pre)``
  with ``Q`` from the frozen query projection of the attention at or beside the site. For FFN and Block
  sites, which have no query projection of their own, the block's attention query projection is used
  (the papers do not say which; this is utune's documented choice); a Block site's input passes through
  the block's pre-attention norm first, the input that projection was trained on. ``V_pre`` starts at
  zero: identity at init.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.modules import Scale
from utune.tuners.registry import register


class PrefixOptions(TunerOptions):
    length: int = Field(default=10, gt=0, description="L: prefix tokens per attention (10 in the papers)")
    scale: Literal["none", "scalar", "channel", "gate"] | float = Field(
        default="channel", description="parallel only: s of OP(x) + s * Attn(Q, K_pre, V_pre), as for adapters"
    )
    init_std: float = Field(default=0.02, gt=0, description="std of the normal init of the prefix keys (and values)")


class PrefixKV(nn.Module):
    """Learned keys and values, ``(L, H·d)`` each, prepended to an attention's ``(B, H, N, d)`` k and v."""

    def __init__(self, length: int, heads: int, head_dim: int, std: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.key = nn.Parameter(torch.empty(length, heads * head_dim).normal_(0, std))
        self.value = nn.Parameter(torch.empty(length, heads * head_dim).normal_(0, std))

    def _expand(self, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        p = p.view(-1, self.heads, self.head_dim).transpose(0, 1).to(like.dtype)  # (H, L, d)
        return p.unsqueeze(0).expand(like.shape[0], -1, -1, -1)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self._expand(self.key, k), k], dim=2), torch.cat([self._expand(self.value, v), v], dim=2)


class ParallelPrefix(nn.Module):
    """``s ⊙ Attn(Q, K_pre, V_pre)`` with Q the (frozen) query projection of the tap, given precomputed."""

    def __init__(self, length: int, dim: int, heads: int, fused: bool, scale: object, std: float) -> None:
        super().__init__()
        self.dim, self.heads, self.fused = dim, heads, fused
        self.key = nn.Parameter(torch.empty(length, dim).normal_(0, std))
        self.value = nn.Parameter(torch.zeros(length, dim))  # zero value path: identity at init
        self.scale = Scale(scale, dim)  # type: ignore[arg-type]

    def forward(self, q_all: torch.Tensor) -> torch.Tensor:
        q = q_all[..., : self.dim] if self.fused else q_all  # (B, N, C)
        b, n, c = q.shape
        d = c // self.heads
        q = q.reshape(b, n, self.heads, d).transpose(1, 2)
        k = self.key.view(-1, self.heads, d).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1).to(q.dtype)
        v = self.value.view(-1, self.heads, d).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.scale(out)


@register
class PrefixKind(TunerKind):
    kind = "prefix"
    Options = PrefixOptions
    summary = "concat: K,V <- [K_pre; K], [V_pre; V] (Li & Liang 2021); parallel: OP(x) + s*Attn(Q, K_pre, V_pre)"
    placements = ("concat", "parallel")
    default_placement = "concat"
    taps = {"concat": (), "parallel": ("input", "output", "parent.input", "parent.output")}

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.placement == "parallel"

    def check(self, site: Site, ctx: PlanContext) -> None:
        if self.placement == "concat":
            found = ctx.attention(site)
            if isinstance(found, str):
                raise self.fail(site, found, hint="select an attention module, e.g. blocks.*.attn")

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:
        opts: PrefixOptions = self.options
        if self.placement == "concat":
            found = ctx.attention(site)
            if isinstance(found, str):
                raise self.fail(site, found)
            heads, head_dim = found
            kv = PrefixKV(opts.length, heads, head_dim, opts.init_std)
            return [Attachment(site, kv, "kv_concat", options={"mask_pad": opts.length})]
        proj = ctx.projections(site.enclosing)
        if proj is None:
            raise self.fail(
                site,
                "no attention query projection (qkv / q) at or beside this site",
                hint="P-Prefix needs a ViT-style attention in the block",
            )
        shape = ctx.shape(site, Tap(self.where))
        if shape is None or len(shape) != 3 or shape[-1] != proj.dim:
            raise self.fail(site, f"its {self.where} {shape} is not a (B, N, {proj.dim}) token tensor")
        module = ParallelPrefix(opts.length, proj.dim, proj.num_heads, proj.fused, opts.scale, opts.init_std)
        return [Attachment(site, module, "add", (ctx.query_tap(proj, site, self.where),))]

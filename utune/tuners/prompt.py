"""Visual prompt tuning and U-Tuning's parallel P-Prompt.

- ``placement: concat`` (VPT, Jia et al. 2022): L learned tokens are inserted into the token sequence
  after the model's class/register tokens at the first selected block, replaced by fresh ones at every
  later selected block (``blocks.0`` = VPT-Shallow, ``blocks.*`` = VPT-Deep), and removed after the last
  block of that sequence, before the model norms and pools, so pooling never sees them. L·C parameters
  a selected block. Not the identity at init (as in the paper).
- ``placement: parallel`` (U-Tuning P-Prompt): ``x' = OP(x) + s ⊙ Attn(Q, P W_k, P W_v)``: prompt tokens P
  through the frozen key/value projections of the attention at or beside the site (for FFN/Block: the
  block's attention, as for P-Prefix). The scale starts at zero, so the model starts as the base.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.graph.rewrite import Rewriter
from utune.graph.select import layer_index
from utune.graph.sites import Site
from utune.tuners.attention import find_projections, query_source
from utune.tuners.base import TunerKind, TunerOptions, node_shape
from utune.tuners.modules import Scale
from utune.tuners.registry import register


class PromptOptions(TunerOptions):
    length: int = Field(default=10, gt=0, description="L: prompt tokens per selected block (10 in the papers)")
    init_std: float = Field(default=0.02, gt=0, description="std of the normal init of the prompt tokens")
    scale: Literal["scalar", "channel"] = Field(
        default="channel", description="parallel only: s of OP(x) + s * Attn(Q, P W_k, P W_v); starts at 0"
    )
    prefix_tokens: int | None = Field(
        default=None, ge=0, description="class/register tokens kept before the prompts; null: read from the model"
    )


class PromptTokens(nn.Module):
    """Insert (``replace=False``) or overwrite (``replace=True``) L tokens after ``skip`` leading tokens."""

    def __init__(self, length: int, dim: int, skip: int, replace: bool, std: float) -> None:
        super().__init__()
        self.skip, self.replace = skip, replace
        self.tokens = nn.Parameter(torch.empty(length, dim).normal_(0, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, self.skip + (self.tokens.shape[0] if self.replace else 0) :]
        return torch.cat([x[:, : self.skip], p, rest], dim=1)


def drop_tokens(x: torch.Tensor, skip: int, length: int) -> torch.Tensor:
    """Remove the L prompt tokens that follow the ``skip`` leading tokens."""
    return torch.cat([x[:, :skip], x[:, skip + length :]], dim=1)


class PromptKV(nn.Module):
    """P (L, C) batch-expanded like ``x``: fed to the frozen k/v projections in the graph."""

    def __init__(self, length: int, dim: int, std: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(length, dim).normal_(0, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)


class ParallelPrompt(nn.Module):
    """``s ⊙ Attn(Q, P W_k, P W_v)`` from the projected query and projected prompts."""

    def __init__(self, length: int, dim: int, heads: int, fused: bool, scale: str, std: float) -> None:
        super().__init__()
        self.dim, self.heads, self.fused = dim, heads, fused
        self.prompt = PromptKV(length, dim, std)
        self.scale = Scale(scale, dim)
        nn.init.zeros_(self.scale.weight)  # zero scale: identity at init, prompts still get gradients after

    def forward(self, q_all: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        c = self.dim
        q = q_all[..., :c] if self.fused else q_all
        k = k_all[..., c : 2 * c] if self.fused else k_all
        v = v_all[..., 2 * c :] if self.fused else v_all
        b, n, _ = q.shape
        d = c // self.heads
        q = q.reshape(b, n, self.heads, d).transpose(1, 2)
        k = k.reshape(b, -1, self.heads, d).transpose(1, 2)
        v = v.reshape(b, -1, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.scale(out)


def prefix_tokens(root: nn.Module) -> int:
    n = getattr(root, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return 1 if hasattr(root, "class_token") or hasattr(root, "cls_token") else 0


@register
class PromptKind(TunerKind):
    kind = "prompt"
    Options = PromptOptions
    summary = (
        "concat: VPT tokens inserted before selected blocks (Jia et al. 2022); parallel: OP(x) + s*Attn(Q, PW_k, PW_v)"
    )
    placements = ("concat", "parallel")
    default_placement = "concat"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.placement == "parallel"

    def check(self, site: Site) -> None:
        if site.op not in ("composite", "module") or site.input is None:
            raise self.fail(site, f"it is a {site.op} site; prompts go before a block (a module with one input)")
        shape = node_shape(site.input)
        if shape is None or len(shape) != 3:
            raise self.fail(
                site,
                f"its input {list(shape) if shape else None} is not a (B, N, C) token sequence",
                hint="prompt tokens need a transformer block taking token sequences",
            )

    def insert_rule(self, rw: Rewriter, sites: list[Site]) -> list[str]:
        if self.placement == "parallel":
            return super().insert_rule(rw, sites)
        opts: PromptOptions = self.options
        skip = opts.prefix_tokens if opts.prefix_tokens is not None else prefix_tokens(rw.root)
        names: list[str] = []
        for i, site in enumerate(sites):
            with rw.pass_for(self.rule.name, site):
                dim = rw.shape(rw.tap(site, "input"))[-1]  # type: ignore[index]
                module = PromptTokens(opts.length, dim, skip, replace=i > 0, std=opts.init_std)
                name = rw.add_module(site, module)
                rw.join_replace_input(site, name)
                names.append(name)
        last = self._last_sibling(rw, sites[-1])
        with rw.pass_for(self.rule.name, last):
            out = rw.output(last)
            y = rw.call_function(drop_tokens, (out, skip, opts.length), after=out)
            rw.redirect(out, y, keep={y})
        return names

    def _last_sibling(self, rw: Rewriter, site: Site) -> Site:
        """The last block of the sequence ``site`` belongs to (``blocks.11`` for ``blocks.3``)."""
        parent, _, leaf = site.path.rpartition(".")
        if layer_index(leaf) is None:
            return site
        siblings = [
            s
            for p, s in rw.sites.items()
            if p.rpartition(".")[0] == parent and p.rpartition(".")[2].isdigit() and s.op in ("composite", "module")
        ]
        return siblings[-1] if siblings else site

    def insert(self, rw: Rewriter, site: Site) -> list[str]:  # parallel P-Prompt
        proj = find_projections(rw.root, site.enclosing)
        if proj is None:
            raise self.fail(
                site,
                "no attention q/k/v projections at or beside this site",
                hint="P-Prompt needs a ViT-style attention in the block",
            )
        where = self.rule.tap or "input"
        tap = rw.tap(site, where)
        shape = rw.shape(tap)
        if shape is None or len(shape) != 3 or shape[-1] != proj.dim:
            raise self.fail(site, f"its {where} {shape} is not a (B, N, {proj.dim}) token tensor")
        opts: PromptOptions = self.options
        module = ParallelPrompt(opts.length, proj.dim, proj.num_heads, proj.fused, opts.scale, opts.init_std)
        name = rw.add_module(site, module)
        tokens = rw.call(f"{name}.prompt", (tap,), after=tap)
        src = query_source(rw, proj, tap)
        q_all = rw.call_base(proj.q, (src,), after=rw.later(tokens, src))
        k_all = rw.call_base(proj.k, (tokens,), after=q_all)
        v_all = k_all if proj.v == proj.k else rw.call_base(proj.v, (tokens,), after=k_all)
        rw.join_add(site, name, q_all, extra=(k_all, v_all), reads=f"{where} through {proj.q}")
        return [name]

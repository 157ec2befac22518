"""Visual prompt tuning and U-Tuning's parallel P-Prompt.

- ``placement: concat`` (VPT, Jia et al. 2022): L learned tokens are inserted into the token sequence
  after the model's class/register tokens at the first selected block, replaced by fresh ones at every
  later selected block (``blocks.0`` = VPT-Shallow, ``blocks.*`` = VPT-Deep), and removed after the last
  block of that sequence, before the model norms and pools, so pooling never sees them. L·C parameters
  a selected block. ``length: [10, 5, ...]`` gives each selected block its own L (NOAH's searched subnets,
  Zhang et al. 2022, arXiv 2206.04673: each block drops the previous block's prompts and inserts its own).
  Not the identity at init (as in the paper). ``init: vpt`` draws the tokens as VPT's code does,
  uniform(±sqrt(6 / (3·p² + C))) with p the patch size (±0.0625 on ViT-B/16); the default is N(0, ``init_std``).
  ``dropout`` drops prompt entries in training, a fresh mask per sample (VPT's ``PROMPT.DROPOUT``, 0 by
  default; NOAH retrains with 0.1).
- ``placement: parallel`` (U-Tuning P-Prompt): ``x' = OP(x) + s ⊙ Attn(Q, P W_k, P W_v)``: prompt tokens P
  through the frozen key/value projections of the attention at or beside the site (for FFN/Block: the
  block's attention, as for P-Prefix). The scale starts at zero, so the model starts as the base.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Frozen, Tap
from utune.graph.select import layer_index
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.modules import Scale, ScaleMode
from utune.tuners.registry import register

PromptInit = tuple[Literal["normal", "uniform"], float]  # (normal, std) or (uniform, bound)


class PromptOptions(TunerOptions):
    # dropout is training noise; init only draws the starting tokens, which a tuner file's tokens replace
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout", "init")

    length: PositiveInt | list[PositiveInt] = Field(
        default=10,
        description="L: prompt tokens per selected block (10 in the papers); concat: a list gives one L per "
        "selected block, in order (NOAH's subnets)",
    )
    init: Literal["normal", "vpt"] = Field(
        default="normal",
        description="normal: N(0, init_std); vpt: VPT's uniform(+-sqrt(6/(3*p*p + C))), p the patch size of the "
        "model's patch embedding (+-0.0625 on ViT-B/16)",
    )
    init_std: float = Field(default=0.02, gt=0, description="std of the normal init of the prompt tokens")
    dropout: float = Field(
        default=0.0, ge=0, lt=1, description="dropout on the prompt tokens in training (VPT: 0; NOAH: 0.1)"
    )
    scale: Literal["scalar", "channel"] = Field(
        default="channel", description="parallel only: s of OP(x) + s * Attn(Q, P W_k, P W_v); starts at 0"
    )
    prefix_tokens: int | None = Field(
        default=None, ge=0, description="class/register tokens kept before the prompts; null: read from the model"
    )


def _tokens(length: int, dim: int, init: PromptInit) -> nn.Parameter:
    how, value = init
    t = torch.empty(length, dim)
    return nn.Parameter(t.normal_(0, value) if how == "normal" else t.uniform_(-value, value))


def _dropout(p: float) -> nn.Dropout | None:
    return nn.Dropout(p) if p > 0 else None  # none at 0: specs without dropout build what they always built


class PromptTokens(nn.Module):
    """Insert L tokens after ``skip`` leading tokens, in place of the ``drop`` prompts an earlier block put there."""

    def __init__(self, length: int, dim: int, skip: int, drop: int, init: PromptInit, dropout: float = 0.0) -> None:
        super().__init__()
        self.skip, self.drop = skip, drop
        self.tokens = _tokens(length, dim, init)
        self.dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.dropout is not None:  # after the expansion: each sample its own mask, as VPT and NOAH do
            p = self.dropout(p)
        rest = x[:, self.skip + self.drop :]
        return torch.cat([x[:, : self.skip], p, rest], dim=1)


class DropTokens(nn.Module):
    """Remove the L prompt tokens that follow the ``skip`` leading tokens (after the last block)."""

    def __init__(self, skip: int, length: int) -> None:
        super().__init__()
        self.skip, self.length = skip, length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.skip], x[:, self.skip + self.length :]], dim=1)


class PromptKV(nn.Module):
    """P (L, C) batch-expanded like ``x``: fed to the frozen k/v projections (their weights are inputs)."""

    def __init__(self, length: int, dim: int, init: PromptInit, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = _tokens(length, dim, init)
        self.dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return p if self.dropout is None else self.dropout(p)


class ParallelPrompt(nn.Module):
    """``s ⊙ Attn(Q, P W_k, P W_v)`` from the projected query and projected prompts."""

    def __init__(
        self, length: int, dim: int, heads: int, fused: bool, scale: ScaleMode, init: PromptInit, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.dim, self.heads, self.fused = dim, heads, fused
        self.prompt = PromptKV(length, dim, init, dropout)
        self.scale = Scale(scale, dim)
        nn.init.zeros_(self.scale.weight)  # zero scale: identity at init, prompts still get gradients after

    def forward(
        self,
        q_all: torch.Tensor,
        w_k: torch.Tensor,
        b_k: torch.Tensor | None,
        w_v: torch.Tensor | None = None,
        b_v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q_all``: the frozen query (or fused qkv) of the tap; ``w_*``/``b_*``: the frozen k/v (or qkv)
        weights, which project the prompts exactly as the attention's own layers would."""
        tokens = self.prompt(q_all)
        k_all = F.linear(tokens, w_k, b_k)
        v_all = k_all if self.fused or w_v is None else F.linear(tokens, w_v, b_v)
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


def patch_embedding(root: nn.Module) -> nn.Conv2d | None:
    """The convolution that cuts the image into patches: timm's ``patch_embed.proj``, torchvision's ``conv_proj``;
    None for a hybrid ViT, whose ``proj`` reads a CNN's features, not image patches."""
    embed = getattr(root, "patch_embed", None)
    if embed is not None and getattr(embed, "backbone", None) is not None:
        return None
    conv = getattr(embed, "proj", None) if embed is not None else getattr(root, "conv_proj", None)
    return conv if isinstance(conv, nn.Conv2d) else None


@register
class PromptKind(TunerKind):
    kind = "prompt"
    Options = PromptOptions
    summary = (
        "concat: VPT tokens inserted before selected blocks (Jia et al. 2022); parallel: OP(x) + s*Attn(Q, PW_k, PW_v)"
    )
    placements = ("concat", "parallel")
    default_placement = "concat"
    taps = {"concat": (), "parallel": ("input", "output", "parent.input", "parent.output")}

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.placement == "parallel"

    def check(self, site: Site, ctx: PlanContext) -> None:
        if site.op not in ("composite", "module") or site.input is None:
            raise self.fail(site, f"it is a {site.op} site; prompts go before a block (a module with one input)")
        shape = site.input_shape()
        if shape is None or len(shape) != 3:
            raise self.fail(
                site,
                f"its input {list(shape) if shape else None} is not a (B, N, C) token sequence",
                hint="prompt tokens need a transformer block taking token sequences",
            )

    def plan_selection(self, sites: list[Site], ctx: PlanContext) -> list[Attachment] | None:
        """VPT: tokens inserted at the first selected block, replaced at each later one, dropped after the
        last block of that sequence."""
        if self.placement == "parallel":
            return None
        opts: PromptOptions = self.options
        skip = opts.prefix_tokens if opts.prefix_tokens is not None else prefix_tokens(ctx.root)
        lengths = self._lengths(sites)
        plan = []
        for i, site in enumerate(sites):
            shape = ctx.shape(site, Tap("input"))
            assert shape is not None  # check() saw a token sequence
            init = self._init(site, ctx, shape[-1])
            module = PromptTokens(lengths[i], shape[-1], skip, lengths[i - 1] if i else 0, init, opts.dropout)
            plan.append(Attachment(site, module, "replace_input", (Tap("input"),), reshapes=True))
        last = self._last_sibling(ctx, sites[-1])
        drop = DropTokens(skip, lengths[-1])
        plan.append(Attachment(last, drop, "replace", (Tap("output"),), role="drop", reshapes=True))
        return plan

    def _init(self, site: Site, ctx: PlanContext, dim: int) -> PromptInit:
        """``(normal, std)``, or VPT's ``(uniform, sqrt(6 / (fan_in + C)))``: xavier-uniform's bound for the
        patch embedding's fan-in (3·p·p) and the token width C."""
        opts: PromptOptions = self.options
        if opts.init == "normal":
            return "normal", opts.init_std
        conv = patch_embedding(ctx.root)
        if conv is None:
            raise self.fail(
                site,
                "`init: vpt` sizes its bound from the convolution that embeds image patches (patch_embed.proj "
                "or conv_proj), and this model has none",
                hint="use init: normal (with init_std) for this model",
            )
        fan_in = conv.weight[0].numel()  # in_chans * p * p (3 * 16 * 16 = 768 on ViT-B/16)
        return "uniform", math.sqrt(6.0 / (fan_in + dim))

    def _lengths(self, sites: list[Site]) -> list[int]:
        length = self.options.length
        if isinstance(length, int):
            return [length] * len(sites)
        if len(length) != len(sites):
            raise self.fail(
                sites[0],
                f"`length` lists {len(length)} prompt lengths but the rule selects {len(sites)} blocks",
                hint="give one length per selected block, in order, or a single number for all",
            )
        return list(length)

    def _last_sibling(self, ctx: PlanContext, site: Site) -> Site:
        """The last block of the sequence ``site`` belongs to (``blocks.11`` for ``blocks.3``)."""
        parent, _, leaf = site.path.rpartition(".")
        if layer_index(leaf) is None:
            return site
        siblings = [
            s
            for p, s in ctx.sites.items()
            if p.rpartition(".")[0] == parent and p.rpartition(".")[2].isdigit() and s.op in ("composite", "module")
        ]
        return siblings[-1] if siblings else site

    def plan(self, site: Site, ctx: PlanContext) -> list[Attachment]:  # parallel P-Prompt
        length = self.options.length
        if not isinstance(length, int):
            raise self.fail(site, "a list of lengths is for placement: concat", hint="give one length: length: 10")
        proj = ctx.projections(site.enclosing)
        if proj is None:
            raise self.fail(
                site,
                "no attention q/k/v projections at or beside this site",
                hint="P-Prompt needs a ViT-style attention in the block",
            )
        shape = ctx.shape(site, Tap(self.where))
        if shape is None or len(shape) != 3 or shape[-1] != proj.dim:
            raise self.fail(site, f"its {self.where} {shape} is not a (B, N, {proj.dim}) token tensor")
        opts: PromptOptions = self.options
        init = self._init(site, ctx, proj.dim)
        module = ParallelPrompt(length, proj.dim, proj.num_heads, proj.fused, opts.scale, init, opts.dropout)
        layers = [proj.k] if proj.fused else [proj.k, proj.v]
        frozen = tuple(Frozen(f"{layer}.{t}") for layer in layers for t in ("weight", "bias"))
        return [Attachment(site, module, "add", (ctx.query_tap(proj, site, self.where), *frozen))]

"""Visual Query Tuning: learnable queries per block that summarise its tokens, read by the head.

Tu et al. 2023, "Visual Query Tuning: Towards Effective Usage of Intermediate Representations for
Parameter and Memory Efficient Transfer Learning" (CVPR, arXiv 2212.03220). Before each selected block, T
query tokens ``P_l`` are appended to its token sequence; inside the block's attention they are queries only
(the keys and values are the original tokens: the queries attend but are not attended to), so every original
token's output is exactly the base model's. The queries' outputs ``O_l = Block_l(P_l | X_l)`` are taken out
after the block and the head reads ``Linear([n(f); n(O_1); ...; n(O_L)])``, ``f`` the head's own input (the
final class token) and ``n`` an L2 normalisation (the official default; ``normalize: false`` drops it).
The head is a new Linear over the concatenation (it replaces the model's classifier, which then trains no
more: leave it out of ``trainable:``), so VQT is not the identity at init, and it does not merge. 12·T·C
query parameters plus ``(C + 12·T·C)·K + K`` for the head on a ViT-B.

Where it applies: blocks of token sequences ``(B, N, C)`` with one global attention visible in the graph
(timm's ViT family: ViT, DeiT, registers, average pooling). Windowed attention (Swin) and CNNs have no global
token sequence to query; an attention that adds a bias of fixed size (BEiT's relative positions) fails on the
extra queries and is refused at build time; torchvision's ``nn.MultiheadAttention`` is one opaque module.
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Ref, Tap, Value
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.registry import register


class VqtOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout",)

    length: int = Field(default=1, gt=0, description="T: query tokens per selected block (tuned per task: 1-20)")
    normalize: bool = Field(default=True, description="L2-normalise each feature before the head (the official code)")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout on the query tokens in training (0.1)")
    head: str | None = Field(default=None, description="the classifier site VQT's head replaces; null: the model's")


class QueryTokens(nn.Module):
    """Append T query tokens to the sequence, after removing the ``drop`` queries of the block before."""

    def __init__(self, length: int, dim: int, drop: int, bound: float, dropout: float) -> None:
        super().__init__()
        self.drop = drop
        self.queries = nn.Parameter(torch.empty(length, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x[:, : x.shape[1] - self.drop]
        q = self.dropout(self.queries.to(x.dtype)).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([keep, q], dim=1)


class KeysWithoutQueries(nn.Module):
    """The attention's keys and values ``(B, H, N + T, d)`` without the last T (the queries)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2] - self.length
        return k[:, :, :n], v[:, :, :n]


class LastTokens(nn.Module):
    """``x[:, -T:]`` (``keep=True``: the queries' outputs) or ``x[:, :-T]`` (the sequence without them)."""

    def __init__(self, length: int, keep: bool) -> None:
        super().__init__()
        self.length, self.keep = length, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1] - self.length
        return x[:, n:] if self.keep else x[:, :n]


class VqtHead(nn.Module):
    """``Linear([n(f); n(O_1); ...; n(O_L)])`` with ``n`` the L2 normalisation of each (flattened) feature."""

    def __init__(self, widths: list[int], classes: int, normalize: bool) -> None:
        super().__init__()
        self.normalize = normalize
        self.fc = nn.Linear(sum(widths), classes)

    def forward(self, feature: torch.Tensor, *summaries: torch.Tensor) -> torch.Tensor:
        parts = [feature, *(s.flatten(1) for s in summaries)]
        if self.normalize:
            parts = [F.normalize(p, dim=-1) for p in parts]
        return self.fc(torch.cat(parts, dim=-1))


def _patch_size(root: nn.Module) -> int:
    """For VPT's query init bound ``sqrt(6 / (3 p² + C))``: the model's patch size (16 when it has none)."""
    size = getattr(getattr(root, "patch_embed", None), "patch_size", None) or getattr(root, "patch_size", None)
    size = size[0] if isinstance(size, tuple | list) else size
    return int(size) if isinstance(size, int) else 16


@register
class VqtKind(TunerKind):
    kind = "vqt"
    Options = VqtOptions
    summary = "queries per block attend to its tokens (not attended to); head reads all (VQT, Tu et al. 2023)"
    placements = ("parallel",)
    taps = {"parallel": ()}  # it reads each block's tokens and the head's input: no tap key
    identity_at_init = False

    def check(self, site: Site, ctx: PlanContext) -> None:
        shape = site.input_shape()
        if site.op not in ("module", "composite") or shape is None or len(shape) != 3:
            raise self.fail(site, "its input is not a (B, N, C) token sequence", hint="select transformer blocks")
        found = ctx.attention(site)
        if isinstance(found, str):
            raise self.fail(site, f"no attention to query: {found}", hint="select blocks with one global attention")

    def plan_selection(self, sites: list[Site], ctx: PlanContext) -> list[Attachment]:
        """Per block: queries in, keys/values without them, their outputs out; then the new head."""
        opts: VqtOptions = self.options
        plan: list[Attachment] = []
        summaries: list[Value] = []
        widths: list[int] = []
        for i, site in enumerate(sites):
            dim = cast(tuple[int, ...], ctx.shape(site, Tap("input")))[-1]
            follows = i > 0 and ctx.reader(sites[i - 1]) is site  # the previous block feeds this one
            if i > 0 and not follows:
                plan.append(self._drop(ctx, sites[i - 1]))
            bound = math.sqrt(6 / (3 * _patch_size(ctx.root) ** 2 + dim))
            queries = QueryTokens(opts.length, dim, opts.length if follows else 0, bound, opts.dropout)
            plan.append(Attachment(site, queries, "replace_input", (Tap("input"),), role="queries", reshapes=True))
            plan.append(
                Attachment(site, KeysWithoutQueries(opts.length), "kv_concat", role="kv", options={"mask_pad": 0})
            )
            plan.append(Attachment(site, LastTokens(opts.length, keep=True), "side", (Tap("output"),), role="summary"))
            summaries.append(Ref(len(plan) - 1))
            widths.append(opts.length * dim)
        plan.append(self._drop(ctx, sites[-1]))
        head = self._head(ctx, sites[-1])
        linear = cast(nn.Linear, head.module)
        module = VqtHead([linear.in_features, *widths], linear.out_features, opts.normalize)
        plan.append(Attachment(head, module, "replace", (Tap("input"), *summaries), role="head"))
        return plan

    def _drop(self, ctx: PlanContext, block: Site) -> Attachment:
        reader = ctx.reader(block)
        if reader is None:
            raise self.fail(block, "no module reads its output, so its queries cannot be removed after it")
        return Attachment(reader, LastTokens(self.options.length, keep=False), "replace_input", (Tap("input"),),
                          role="drop", reshapes=True)  # fmt: skip

    def _head(self, ctx: PlanContext, near: Site) -> Site:
        cfg = getattr(ctx.root, "pretrained_cfg", None) or {}
        names = [self.options.head] if self.options.head else [cfg.get("classifier"), "head", "heads.head", "fc"]
        for name in names:
            site = ctx.site(name) if isinstance(name, str) else None
            if site is not None and site.op == "module" and isinstance(site.module, nn.Linear):
                return site
        raise self.fail(
            near,
            f"no Linear classifier site among {', '.join(n for n in names if isinstance(n, str))}",
            hint="set head: to the path of the model's classifier Linear (`utune inspect MODEL`)",
        )

"""LoRA: ``y = W x + (alpha / r) · B A x`` on a Linear or Conv2d (Hu et al. 2021, arXiv 2106.09685).

``B`` starts at zero, so the tuned model equals the base at init. On a fused ``qkv`` Linear,
``slices: [q, v]`` gives only those output slices a delta (the k slice stays exactly frozen).
Mergeable: ``W += (alpha / r) · B A``.

Grouped and depthwise convolutions (``groups = g``) get one low-rank pair per group,
``ΔW_i = B_i A_i`` with ``A_i: (in/g)·k·k -> r`` and ``B_i: r -> out/g`` (``rank`` is per group): ``A`` is a
grouped k x k conv, ``B`` a grouped 1 x 1 conv, and ``ΔW`` has the layer's own grouped shape, so it folds.
(PEFT's grouped LoRA instead mixes all input channels in a dense ``A``, which cannot fold into a grouped
weight; utune's per-group form is a different, mergeable parameterisation.)
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from utune.graph.context import PlanContext
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions, is_fused_qkv
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.registry import register

SLICES = ("q", "k", "v")


class LoraOptions(TunerOptions):
    runtime_only: ClassVar[tuple[str, ...]] = ("dropout",)  # change no weight: a tuner file loads whatever they are

    rank: int = Field(default=8, gt=0, description="r: the rank of B A")
    alpha: float | None = Field(default=None, gt=0, description="scaling = alpha / r; null: alpha = r (scaling 1)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the input of A during training")
    slices: list[Literal["q", "k", "v"]] | None = Field(
        default=None, description="fused qkv only: the output thirds that get a delta, e.g. [q, v]; null: all"
    )


def _pads_same(conv: nn.Conv2d) -> bool:
    """timm's ``Conv2dSame`` / ``StdConv2dSame`` pad each input to TF's "same" before a padding-0 convolution."""
    return type(conv).__name__ == "Conv2dSame" or bool(getattr(conv, "same_pad", False))


def _standardises_weight(mod: nn.Module) -> bool:
    """timm's ``StdConv2d`` family normalises its weight inside ``forward`` (BiT, NFNet, ViT-hybrid stems)."""
    return any(c.__name__ in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
               for c in type(mod).__mro__)  # fmt: skip


class LoraBranch(nn.Module):
    """``B A x`` for one output block: Linear A (in -> r), B (r -> out); Conv2d A (k x k), B (1 x 1), each
    grouped like the layer (``g`` groups: A in -> g·r, B g·r -> out, one rank-r pair per group)."""

    lora_A: nn.Linear | nn.Conv2d
    lora_B: nn.Linear | nn.Conv2d

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, out: int) -> None:
        super().__init__()
        self.groups = base.groups if isinstance(base, nn.Conv2d) else 1
        if isinstance(base, nn.Conv2d):
            pair = cast(tuple[int, int], base.kernel_size)
            stride, dilation = cast(tuple[int, int], base.stride), cast(tuple[int, int], base.dilation)
            padding = cast(tuple[int, int] | str, base.padding)
            g = self.groups
            self.lora_A = nn.Conv2d(base.in_channels, g * rank, pair, stride, padding, dilation, groups=g, bias=False)
            self.lora_B = nn.Conv2d(g * rank, out, 1, groups=g, bias=False)
            self.same_pad = _pads_same(base)  # TF-style "same" padding computed per input (timm's *Conv2dSame)
        else:
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, out, bias=False)
            self.same_pad = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:  # pad as the layer does, so B A x lines up with W x
            from timm.layers.padding import pad_same

            a = cast(nn.Conv2d, self.lora_A)
            x = pad_same(x, list(a.kernel_size), list(a.stride), list(cast(tuple[int, int], a.dilation)))
        return self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.ndim == 4:  # conv, per group i: (out/g, r) @ (r, in/g·k·k) -> the layer's (out, in/g, k, k)
            g = self.groups
            dw = torch.bmm(b.reshape(g, b.shape[0] // g, -1), a.reshape(g, a.shape[0] // g, -1))
            return dw.reshape(b.shape[0], *a.shape[1:])
        return b @ a


class Lora(nn.Module):
    """The LoRA of one layer. The training step is kept lean (it runs once per layer per step): no dropout op
    when ``dropout`` is 0, ``scaling`` folded into ``B``'s weight (a few thousand numbers) rather than applied
    to the delta (batch x tokens x out), and on a fused qkv one matmul for every slice's ``A`` (stacked) and
    one for every ``B`` (a block matrix with zero blocks for frozen thirds) instead of a matmul per slice, a
    zero tensor and a concatenation."""

    branch: LoraBranch
    branches: nn.ModuleDict
    part: int

    def __init__(self, base: nn.Linear | nn.Conv2d, opts: LoraOptions) -> None:
        super().__init__()
        self.scaling = (opts.alpha if opts.alpha is not None else opts.rank) / opts.rank
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else None
        out = base.out_channels if isinstance(base, nn.Conv2d) else base.out_features
        self.slices = list(opts.slices) if opts.slices else None
        if self.slices is None:
            self.branch = LoraBranch(base, opts.rank, out)
        else:
            self.part = out // 3
            self.branches = nn.ModuleDict({s: LoraBranch(base, opts.rank, self.part) for s in self.slices})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        if self.slices is None:
            br = self.branch
            if isinstance(br.lora_A, nn.Conv2d):
                y = br(x)
                return y if self.scaling == 1.0 else y * self.scaling  # skip a full-size multiply when alpha = r
            return F.linear(F.linear(x, br.lora_A.weight), self._scaled(br.lora_B.weight))
        a, b = self.stacked()
        return F.linear(F.linear(x, a), b)

    def _scaled(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.scaling == 1.0 else w * self.scaling

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices as one pair: ``A`` = the slices' ``A`` stacked (sum of ranks x in), ``B`` = (out x sum of
        ranks) with ``scaling · B_s`` in slice ``s``'s rows and columns, zeros elsewhere; ``B A = delta_weight``."""
        names = [s for s in SLICES if s in self.branches]
        a = (
            torch.cat([self.slice(s).lora_A.weight for s in names])
            if len(names) > 1
            else self.slice(names[0]).lora_A.weight
        )
        ranks = [self.slice(s).lora_A.weight.shape[0] for s in names]
        total, before, rows = sum(ranks), 0, []
        for s in SLICES:
            if s not in self.branches:
                rows.append(a.new_zeros(self.part, total))
                continue
            r = ranks[names.index(s)]
            rows.append(F.pad(self._scaled(self.slice(s).lora_B.weight), (before, total - before - r)))
            before += r
        return a, torch.cat(rows)

    def fold(self, layer: Layer, tap: str) -> None:
        """Merge: ``W' = W + (alpha/r) B A`` (slices: zero blocks for the frozen thirds)."""
        if tap != "input":
            raise NotMergeable(f"it does not read the input of {layer.path}")
        if getattr(layer.module, "padding_mode", "zeros") != "zeros":
            raise NotMergeable(f"{layer.path} pads with {layer.module.padding_mode!r}, LoRA's conv pads with zeros")
        if _standardises_weight(layer.module):
            raise NotMergeable(
                f"{layer.path} ({type(layer.module).__name__}) standardises its weight in every forward pass, so a "
                "change added to the weight would be standardised too"
            )
        layer.add_input_map(cast(torch.Tensor, f64(self.delta_weight())), None)

    def delta_weight(self) -> torch.Tensor:
        """The exact weight change ``scaling · B A`` (slices stacked with zeros for the frozen thirds)."""
        if self.slices is None:
            return self.branch.delta_weight() * self.scaling
        blocks = []
        for s in SLICES:
            if s in self.branches:
                blocks.append(self.slice(s).delta_weight() * self.scaling)
            else:
                ref = self.slice(next(iter(self.branches))).delta_weight()
                blocks.append(torch.zeros_like(ref))
        return torch.cat(blocks, dim=0)

    def slice(self, name: str) -> LoraBranch:
        """The branch of one qkv slice (``q``, ``k`` or ``v``)."""
        return cast(LoraBranch, self.branches[name])


@register
class LoraKind(TunerKind):
    kind = "lora"
    Options = LoraOptions
    summary = "y = W x + (alpha/r) B A x on a Linear/Conv2d; Hu et al. 2021 (LoRA)"
    placements = ("parallel",)
    taps = {"parallel": ("input",)}  # B A reads the layer's own input: nothing else folds into W
    mergeable = True

    def check(self, site: Site, ctx: PlanContext) -> None:
        mod = site.module
        if site.op != "module" or not isinstance(mod, nn.Linear | nn.Conv2d):
            raise self.fail(
                site,
                f"it is a {site.type} ({site.op}), LoRA needs a Linear or Conv2d layer",
                hint="select layers with `type: Linear` or a glob ending in the layer name",
            )
        if self.options.slices and not is_fused_qkv(site):
            raise self.fail(
                site,
                f"`slices` need a fused qkv Linear (named *qkv*, out = 3 x in); this is a {site.type}",
                hint="drop `slices` for this rule, or select the attention's qkv layer",
            )

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        return Lora(cast(nn.Linear | nn.Conv2d, site.module), self.options)  # check() made sure

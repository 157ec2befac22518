"""``kind: module``: any ``nn.Module`` class of your own code as the tuner U, attached by the engine.

``x' = OP(x) + s · U(tap)``: parallel (the default) reads the site's input, sequential its output (or the
rule's ``tap:``), and the result is added to the site's output, scaled by ``s`` (``scale:``: none, a learned
scalar or per-channel vector, an input gate, or a fixed number). The rule names the class
(``class: my_pkg.mods:MyU``, imported through :mod:`utune._imports`: only when you named it) and its extra
arguments (``kwargs:``). It is built as ``MyU(channels, **kwargs)``, or ``MyU(in_channels, out_channels,
**kwargs)`` when the tap and the output differ in channels, and called on the tap with its channels *last*
(``(B, N, C)`` tokens, ``(B, H, W, C)`` maps: utune moves NCHW channels there and back), so a plain
``nn.Sequential(nn.Linear, nn.GELU, nn.Linear)`` serves a ViT, a Swin, a ConvNeXt and a ResNet alike.

Whether the model starts as the base one is the module's choice (zero-init its last layer): the kind
promises nothing either way, and ``apply --verify`` (and :func:`utune.testing.check_kind`) report the
difference. It trains and exports tuner-only like any kind; it does not fold (``export --merge``): a tuner
that folds is a kind with a ``fold`` (docs/adding-a-kind.md).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from utune.graph.context import PlanContext
from utune.graph.manifest import Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.modules import Scale, ScaleMode
from utune.tuners.registry import register


class ModuleOptions(TunerOptions):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    module_class: str = Field(
        alias="class", description="package.module:Class, an nn.Module of your code: U, built with the channel count"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments of the class")
    scale: ScaleMode = Field(
        default="none",
        description="s of x' = OP(x) + s*U(tap): none, a learned scalar, a per-channel vector, an input gate, "
        "or a fixed number",
    )
    channel_dim: Literal[1, -1] | None = Field(
        default=None, description="channels of the values at 1 (NCHW) or -1 (tokens, NHWC); null: from the layers"
    )

    @field_validator("module_class")
    @classmethod
    def _a_module_class(cls, ref: str) -> str:
        from utune._imports import is_ref

        if not is_ref(ref):
            raise ValueError(f"class {ref!r} is not package.module:Class (e.g. my_pkg.mods:MyAdapter)")
        module_class(ref)
        return ref


def module_class(ref: str) -> type[nn.Module]:
    """The class ``ref`` names, imported when the user named it; ValueError (for the spec's line) otherwise."""
    from utune._imports import load_ref
    from utune.errors import UserInputError

    try:
        obj = load_ref(ref, what="module class")
    except UserInputError as e:
        raise ValueError(f"{e.message}; {e.hint}" if e.hint else e.message) from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"class {ref!r} is {obj!r}, not a torch.nn.Module subclass")
    return obj


class ModuleTuner(nn.Module):
    """``s · U(tap)`` with U the user's module, called on the tap with its channels last."""

    def __init__(self, inner: nn.Module, channel_dim: int, scale: Scale) -> None:
        super().__init__()
        self.inner = inner
        self.channel_dim = channel_dim
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.channel_dim
        last = x if d in (-1, x.ndim - 1) else x.movedim(d, -1)
        y = self.scale(self.inner(last), last)
        return y if d in (-1, x.ndim - 1) else y.movedim(-1, d)


@register
class ModuleKind(TunerKind):
    kind = "module"
    Options = ModuleOptions
    summary = "x' = OP(x) + s*U(tap), U any nn.Module class of your code (class: pkg.mod:Class)"

    @property
    def identity_at_init(self) -> bool | None:  # type: ignore[override]
        """Not promised either way: the user's module decides (``--verify`` measures it)."""
        return None

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        opts: ModuleOptions = self.options
        tap_shape, out_shape = ctx.shape(site, Tap(self.where)), ctx.output_shape(site)
        if tap_shape is None or out_shape is None:
            raise self.fail(site, "its input or output is not a single tensor")
        dim = ctx.channel_dim(site, out_shape, opts.channel_dim)
        others = [s for i, s in enumerate(out_shape) if i != dim % len(out_shape)]
        if (
            len(tap_shape) != len(out_shape)
            or [s for i, s in enumerate(tap_shape) if i != dim % len(tap_shape)] != others
        ):
            raise self.fail(
                site,
                f"its tap {list(tap_shape)} and output {list(out_shape)} differ in more than channels",
                hint="select a site that keeps its tokens/resolution, or use placement: sequential",
            )
        c_in, c_out = tap_shape[dim], out_shape[dim]
        args = (c_out,) if c_in == c_out else (c_in, c_out)
        cls = module_class(opts.module_class)
        call = f"{opts.module_class}({', '.join(map(str, args))}{', **kwargs' if opts.kwargs else ''})"
        try:
            inner = cls(*args, **opts.kwargs)
        except Exception as e:
            raise self.fail(
                site,
                f"{call} failed: {type(e).__name__}: {e}",
                hint="the class takes the channel count first (in and out counts when they differ), then `kwargs:`",
            ) from None
        module = ModuleTuner(inner, dim, Scale(opts.scale, c_out, c_in))
        self._check_output(site, module, tap_shape, out_shape, call)
        return module

    def _check_output(
        self, site: Site, module: nn.Module, tap: tuple[int, ...], out: tuple[int, ...], call: str
    ) -> None:
        """U must return a tensor of the site's output shape: tried once on zeros, in eval mode."""
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                y = module(torch.zeros(tap))
        except Exception as e:
            raise self.fail(site, f"{call} fails on its input {list(tap)}: {type(e).__name__}: {e}") from None
        finally:
            module.train(was)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(out):
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise self.fail(site, f"{call} returns {got}; the site's output is {list(out)} (channels last for U)")

"""What every tuner kind is: options, the sites it serves, the module it builds, how it attaches.

A kind subclasses :class:`TunerKind`, sets ``kind`` and ``Options``, and is registered with
``@register``. The default :meth:`TunerKind.insert` is the U-Tuning mechanism,
``x' = OP(x) + U(tap)``: tap = the site's input (parallel) or output (sequential), join = add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx, nn

from utune._schema import Section
from utune.errors import SelectionError

if TYPE_CHECKING:
    from utune.graph.rewrite import Rewriter
    from utune.graph.sites import Site


class TunerOptions(Section):
    """The kind's own keys in a rule (``dim``, ``rank``...). Subclasses add fields with defaults and a
    ``description`` each (``utune tuners`` and the JSON schema show it).

    ``runtime_only`` names options that change no weight (dropout): a tuner file trained with other
    values of them still loads.
    """

    runtime_only: ClassVar[tuple[str, ...]] = ()


class TunerKind:
    kind: ClassVar[str]
    Options: ClassVar[type[TunerOptions]] = TunerOptions
    summary: ClassVar[str] = ""  # one line: the math and the paper
    placements: ClassVar[tuple[str, ...]] = ("parallel", "sequential")
    default_placement: ClassVar[str] = "parallel"
    identity_at_init: ClassVar[bool] = True  # tuned == base at init
    identity_atol: ClassVar[float] = 0.0  # the tolerance of that claim (0 = bit-exact)
    mergeable: ClassVar[bool] = False  # folds into the base weights (export --merge)

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.options = rule.options
        self.placement: str = rule.placement or self.default_placement
        if self.placement not in self.placements:
            raise SelectionError(
                f"rule {rule.name!r}: kind {self.kind} has no placement {self.placement!r}",
                hint=f"use one of: {', '.join(self.placements)}",
            )

    # ----- per kind -----
    def check(self, site: Site) -> None:
        """Raise SelectionError when this kind cannot serve ``site``."""

    def build(self, site: Site, rw: Rewriter) -> nn.Module:
        raise NotImplementedError

    def insert(self, rw: Rewriter, site: Site) -> list[str]:
        """Attach one tuner at ``site``; return the names of the modules added."""
        module = self.build(site, rw)
        name = rw.add_module(site, module)
        where = self.rule.tap or ("input" if self.placement == "parallel" else "output")
        rw.join_add(site, name, where)
        return [name]

    def insert_rule(self, rw: Rewriter, sites: list[Site]) -> list[str]:
        """Attach this rule at every selected site, each as its own pass; kinds needing the whole
        selection at once (prompt tokens carried across blocks) override this."""
        names: list[str] = []
        for site in sites:
            with rw.pass_for(self.rule.name, site):
                names += self.insert(rw, site)
        return names

    # ----- helpers -----
    def fail(self, site: Site, why: str, hint: str | None = None) -> SelectionError:
        return SelectionError(f"rule {self.rule.name!r}: {self.kind} cannot attach to {site.path}: {why}", hint=hint)


def is_fused_qkv(site: Site) -> bool:
    """A fused q/k/v projection: a Linear named like ``qkv`` whose output is three times its input."""
    mod = site.module
    leaf = site.path.rpartition(".")[2].lower()
    return isinstance(mod, nn.Linear) and mod.out_features == 3 * mod.in_features and "qkv" in leaf


def node_shape(node: fx.Node | None) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if node is not None else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _module_channels(mod: nn.Module) -> tuple[int, int] | None:
    """(dim, channels) a leaf module produces: (1, C) for convs/BN/LayerNorm2d, (-1, C) for Linear/LN."""
    if isinstance(mod, _CHANNEL_FIRST) or type(mod).__name__ in ("LayerNorm2d", "BatchNormAct2d"):
        c = (
            getattr(mod, "out_channels", None)
            or getattr(mod, "num_features", None)
            or getattr(mod, "num_channels", None)
        )
        if c is None and hasattr(mod, "weight") and mod.weight is not None:
            c = mod.weight.shape[0]
        return (1, int(c)) if c else None
    if isinstance(mod, nn.Linear):
        return (-1, mod.out_features)
    if isinstance(mod, nn.LayerNorm):
        return (-1, int(mod.normalized_shape[-1]))
    return None


def channel_dim(site: Site, shape: tuple[int, ...], override: int | None = None) -> int:
    """Which dim of ``shape`` holds channels: the last for tokens ``(B, N, C)``, 1 or -1 for maps."""
    if override is not None:
        return override
    if len(shape) <= 3:
        return -1
    mods: list[nn.Module] = []
    if site.module is not None and site.op == "module":
        mods = [site.module]
    else:  # the last layer inside the composite that decides the layout
        from torch.fx import Node

        gm_nodes: list[Node] = [n for n in site.nodes if n.op == "call_module"]
        owner = site.nodes[0].graph.owning_module if site.nodes else None
        mods = [owner.get_submodule(str(n.target)) for n in reversed(gm_nodes)] if owner is not None else []
    for mod in mods:
        found = _module_channels(mod)
        if found is not None and shape[found[0]] == found[1]:
            return found[0]
    if shape[1] != shape[-1]:
        raise SelectionError(
            f"cannot tell the channel dim of {site.path} (shape {list(shape)}): channels first or last?",
            hint="set channel_dim: 1 (NCHW) or channel_dim: -1 (NHWC) in the rule",
        )
    return 1


def move_channels_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == -1 or dim == x.ndim - 1 else x.movedim(dim, -1)


def move_channels_back(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == -1 or dim == x.ndim - 1 else x.movedim(-1, dim)

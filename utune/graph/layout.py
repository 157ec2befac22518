"""Which dim of a site's output holds channels: the last for tokens ``(B, N, C)``; for feature maps, read
from the layers that produce them (convolutions and BatchNorm mean channels first)."""

from __future__ import annotations

from torch import fx, nn

from utune.errors import SelectionError
from utune.graph.sites import Site

_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def module_channels(mod: nn.Module) -> tuple[int, int] | None:
    """(dim, channels) a leaf module produces: (1, C) for convs/BN/LayerNorm2d, (-1, C) for Linear/LN."""
    if isinstance(mod, _CHANNEL_FIRST) or type(mod).__name__ in ("LayerNorm2d", "BatchNormAct2d"):
        c = (
            getattr(mod, "out_channels", None)
            or getattr(mod, "num_features", None)
            or getattr(mod, "num_channels", None)
        )
        weight = getattr(mod, "weight", None)
        if c is None and isinstance(weight, nn.Parameter):
            c = weight.shape[0]
        return (1, int(c)) if c else None
    if isinstance(mod, nn.Linear):
        return (-1, mod.out_features)
    if isinstance(mod, nn.LayerNorm):
        return (-1, int(mod.normalized_shape[-1]))
    return None


def channel_dim(site: Site, shape: tuple[int, ...], override: int | None = None) -> int:
    """Which dim of ``shape`` (the site's output) holds channels: -1 for tokens, 1 or -1 for maps."""
    if override is not None:
        return override
    if len(shape) <= 3:
        return -1
    mods: list[nn.Module] = []
    if site.module is not None and site.op == "module":
        mods = [site.module]
    else:  # the last layer inside the composite that decides the layout
        calls: list[fx.Node] = [n for n in site.nodes if n.op == "call_module"]
        owner = site.nodes[0].graph.owning_module if site.nodes else None
        mods = [owner.get_submodule(str(n.target)) for n in reversed(calls)] if owner is not None else []
    for mod in mods:
        found = module_channels(mod)
        if found is not None and shape[found[0]] == found[1]:
            return found[0]
    if shape[1] != shape[-1]:
        raise SelectionError(
            f"cannot tell the channel dim of {site.path} (shape {list(shape)}): channels first or last?",
            hint="set channel_dim: 1 (NCHW) or channel_dim: -1 (NHWC) in the rule",
        )
    return 1


def input_channel_dim(site: Site, shape: tuple[int, ...], override: int | None = None) -> int:
    """Which dim of the site's input (of ``shape``) holds channels: the layer's own input layout."""
    if override is not None:
        return override
    mod = site.module if site.op == "module" else None
    if isinstance(mod, nn.Linear) and shape[-1] == mod.in_features:
        return -1
    if isinstance(mod, _CHANNEL_FIRST) and len(shape) > 2:
        c = (
            getattr(mod, "in_channels", None)
            or getattr(mod, "num_features", None)
            or getattr(mod, "num_channels", None)
        )
        if c == shape[1]:
            return 1
    if len(shape) <= 3:
        return -1
    raise SelectionError(
        f"cannot tell the channel dim of the input of {site.path} (shape {list(shape)})",
        hint="set channel_dim: 1 (NCHW) or channel_dim: -1 (NHWC) in the rule",
    )

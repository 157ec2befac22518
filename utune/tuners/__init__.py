"""Tuner kinds: one file each. Importing this package imports every module in it, and a kind registers
itself where it is defined (``@register``): adding a kind is adding its file, nothing else names it."""

import importlib
import pkgutil

from utune.tuners.registry import get_kind, kinds, register

_SUPPORT = {"base", "registry", "fold", "modules"}  # the machinery, not kinds

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SUPPORT and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["get_kind", "kinds", "register"]

"""Tuner kinds: one file each. Importing this package imports every kind file in it, and a kind registers
itself where it is defined (``@register``): adding a kind is adding its file, nothing else names it."""

from utune.tuners.registry import get_kind, kinds, load_builtins, register

load_builtins()

__all__ = ["get_kind", "kinds", "register"]

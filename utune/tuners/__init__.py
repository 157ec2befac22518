"""Tuner kinds: one file each; importing this package registers the built-in ones."""

from utune.tuners import adapter, bypass, lora, prefix, prompt, scaling  # noqa: F401  (registration side effects)
from utune.tuners.registry import get_kind, kinds, register

__all__ = ["get_kind", "kinds", "register"]

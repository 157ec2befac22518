"""``trainable:`` entries that pick base modules by class, not by parameter name.

A glob such as ``blocks.*.norm1.weight`` depends on how a model names its layers; LN-Tune (train only the
normalisation layers) and DiffFit (biases, norms and a scale) mean *every layer of a kind*. The entry
``{type: LayerNorm}`` (or a list of types, optionally under ``path:`` globs) makes every parameter of every
module of that class trainable, subclasses included, as ``type:`` does in a rule's ``at:``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from torch import nn

from utune._schema import Section
from utune.graph.glob import glob_match


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class TypeSelector(Section):
    """One ``trainable:`` mapping: modules whose class (or a base class) is one of ``type``, under ``path``."""

    type: list[str] = Field(min_length=1, description="module class names, e.g. LayerNorm (subclasses included)")
    path: list[str] = Field(default=["**"], description="module path globs the modules must match")

    @field_validator("type", "path", mode="before")
    @classmethod
    def _str_to_list(cls, value: Any) -> Any:
        return _as_list(value)

    def describe(self) -> str:
        """In the report's words: ``type=LayerNorm`` (``type=LayerNorm, path=blocks.*``)."""
        where = f", path={'|'.join(self.path)}" if self.path != ["**"] else ""
        return f"type={'|'.join(self.type)}{where}"


def _class_names(mod: nn.Module) -> set[str]:
    mro = type(mod).__mro__
    return {c.__name__ for c in mro} | {f"{c.__module__}.{c.__qualname__}" for c in mro}


def typed_parameters(root: nn.Module, sel: TypeSelector) -> list[str]:
    """Names of the parameters of every module of ``root`` that ``sel`` picks, in module order."""
    wanted = set(sel.type)
    names: list[str] = []
    for path, mod in root.named_modules():
        if not wanted & _class_names(mod) or not any(glob_match(g, path) for g in sel.path):
            continue
        for name, _ in mod.named_parameters(prefix=path):
            if name not in names:
                names.append(name)
    return names


def module_types(root: nn.Module) -> list[str]:
    """The class names of ``root``'s modules that own parameters (for a did-you-mean)."""
    return sorted({type(m).__name__ for m in root.modules() if any(True for _ in m.parameters(recurse=False))})

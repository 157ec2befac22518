"""Tensors shared by every site of a rule: one tensor object, tied into each site's tuner module.

A rule's ``share: [lora_A.weight]`` (or a kind's own ``Attachment.shared``) makes the named tensor of every
site's module the *same* object as the first site's. Because it is one object, it gets one gradient, one
optimizer state, one entry in checkpoints and tuner-only files (they keep a tensor under its first name;
see :func:`utune.train.checkpoint.trainable_state`) and is counted once in the report; each site's merge
reads it through its own module, so it folds into every layer that uses it. ``trainable: false`` turns the
shared tensor into a frozen (persistent) buffer, e.g. a seeded random projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from utune._schema import Section
from utune.errors import RewriteError


class Share(Section):
    """A rule's ``share:``: which of its tuner modules' tensors are one tensor for all its sites."""

    tensors: list[str] = Field(
        min_length=1, description="tensor names inside the kind's module, e.g. lora_A.weight (`utune tuners`)"
    )
    trainable: bool = Field(default=True, description="false: the shared tensor is a frozen buffer")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: object) -> object:
        if isinstance(value, str):
            return {"tensors": [value]}
        return {"tensors": value} if isinstance(value, list) else value


def _locate(module: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return None
    if leaf in owner._parameters or leaf in owner._buffers:
        return owner, leaf
    return None


def has_tensor(module: nn.Module, name: str) -> bool:
    return _locate(module, name) is not None


def tensor_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]


def _get(owner: nn.Module, leaf: str) -> torch.Tensor:
    tensor = owner._parameters.get(leaf)
    return tensor if tensor is not None else owner._buffers[leaf]  # type: ignore[return-value]


def _put(owner: nn.Module, leaf: str, tensor: torch.Tensor) -> None:
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    if isinstance(tensor, nn.Parameter):
        owner._parameters[leaf] = tensor
    else:
        owner._buffers[leaf] = tensor


def tie(
    ties: dict[str, torch.Tensor], module: nn.Module, names: Sequence[str], frozen: set[str], where: str
) -> tuple[str, ...]:
    """Tie ``names`` of ``module`` to the tensors in ``ties`` (the first module's, recorded here)."""
    for name in names:
        found = _locate(module, name)
        if found is None:
            raise RewriteError(f"{where}: the tuner has no tensor {name!r} to share", hint="check the rule's `share`")
        owner, leaf = found
        mine = _get(owner, leaf)
        if name not in ties:
            ties[name] = mine.detach().clone() if name in frozen else mine  # frozen: a buffer, not a parameter
            _put(owner, leaf, ties[name])
            continue
        if tuple(ties[name].shape) != tuple(mine.shape):
            raise RewriteError(
                f"{where}: the shared tensor {name} is {tuple(mine.shape)} here but {tuple(ties[name].shape)} at "
                "the rule's first site",
                hint="share only tensors of one shape across the selected sites (or split the rule)",
            )
        _put(owner, leaf, ties[name])
    return tuple(names)

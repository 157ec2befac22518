"""Sharded training (``train.parallel: fsdp``) with torch's FSDP2 (``fully_shard``), for backbones that do
not fit one GPU.

A utune model is a GraphModule that calls its leaf layers directly (a Block is traced through, never
called), so the shard groups are the *called* modules that own parameters (every Linear/Conv/Norm and every
tuner module), each gathered around its own call, plus the root for the rest (position embeddings, tokens).
Checkpoints stay those of a single process: the trainable tensors are gathered in full on every rank
(``full_tensor``, a collective) and written by rank 0; the optimizer state is gathered in full with
``torch.distributed.checkpoint.state_dict`` (names, not indices) and broadcast back on resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from utune.errors import UserInputError


def _called_with_params(gm: nn.Module) -> list[str]:
    """Module paths the graph calls that own parameters, and whose weights no graph node reads directly."""
    graph = getattr(gm, "graph", None)
    if not isinstance(graph, fx.Graph):
        return [n for n, m in gm.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    attrs = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    called = []
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) in called:
            continue
        path = str(node.target)
        if any(a.startswith(path + ".") for a in attrs):
            raise UserInputError(
                f"train.parallel: fsdp cannot shard {path}: the tuned graph also reads its weights directly",
                hint="use train.parallel: ddp with this spec (e.g. P-Prompt reads the frozen k/v weights)",
            )
        if any(True for _ in gm.get_submodule(path).parameters()):
            called.append(path)
    return called


def shard(model: nn.Module) -> int:
    """``fully_shard`` every called layer with parameters (innermost first), then the root; returns how many."""
    from torch.distributed.fsdp import fully_shard

    paths = _called_with_params(model)
    inner = [p for p in paths if not any(o != p and o.startswith(p + ".") for o in paths)]
    for path in inner:
        fully_shard(model.get_submodule(path))
    fully_shard(model)
    return len(inner) + 1


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every sharded tensor gathered in full (a collective: every rank calls it), the rest as they are."""
    return {k: v.full_tensor().detach() if is_sharded(v) else v for k, v in tensors.items()}  # type: ignore[attr-defined]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state gathered in full on rank 0 (keyed by parameter name; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"fsdp": get_optimizer_state_dict(model, optimizer, options=options)}


def load(model: nn.Module, optimizer: torch.optim.Optimizer, weights: Mapping[str, torch.Tensor], saved: dict) -> None:
    """Restore the trainable tensors and the optimizer from full (single-process) tensors on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, saved["fsdp"], options=StateDictOptions(full_state_dict=True))

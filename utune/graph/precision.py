"""Hold the frozen backbone in a lower precision: the pass behind ``model.frozen_dtype: bfloat16``.

A value *needs a gradient* when it depends on a trainable tensor (a tuner, a trained head); ``torch.detach``
cuts that dependence. Every op of the graph whose value needs none (a Res-Tuning-Bypass backbone entirely;
with LoRA or adapters only what comes before the first tuner) runs in ``dtype``: the frozen modules and
tensors only those ops read are cast to ``dtype`` once (half the weight memory in bf16), the image is cast
where such an op reads it, and each value that such an op hands to the trainable part is cast back to
float32 (a module that says ``reads_low_precision`` casts for itself, e.g. a bypass side step, which can then
keep its input in bf16 for backward). A frozen layer whose output a tuner joins (LoRA's qkv) or reads stays
float32, its input cast, so merging sees it as before. The trainable part computes in float32 as before: only the frozen
features it reads are rounded to ``dtype`` (relative error about 2^-8).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from utune.errors import RewriteError


def to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors (also inside tuples and lists) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple | list):
        return type(value)(to_dtype(v, dtype) for v in value)
    return value


def _needs_grad(gm: fx.GraphModule) -> set[fx.Node]:
    trained = {n for n, p in gm.named_parameters() if p.requires_grad}

    def owns(target: str) -> bool:
        return any(t == target or t.startswith(target + ".") for t in trained)

    grad: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or (node.op == "call_function" and node.target is torch.detach):
            continue
        if (node.op in ("call_module", "get_attr") and owns(str(node.target))) or any(
            a in grad for a in node.all_input_nodes
        ):
            grad.add(node)
    return grad


def hold_frozen(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    """Run the ops of ``gm`` that need no gradient in ``dtype`` (see the module docstring); returns how many
    frozen tensors were cast. Lints and recompiles ``gm``."""
    grad = _needs_grad(gm)
    low = [n for n in gm.graph.nodes if n not in grad and n.op not in ("placeholder", "output")]
    # a frozen layer a tuner joins (LoRA on the first qkv) stays float32: its output is the value the tuner
    # changes, so merge still finds the layer's output read by the join alone
    low = [n for n in low if not (n.op == "call_module" and any(_joins(gm, u, grad) for u in n.users))]
    low_set = set(low)
    grad_modules = {str(n.target) for n in grad if n.op == "call_module"}
    cast_modules = {str(n.target) for n in low if n.op == "call_module"}
    shared = cast_modules & grad_modules
    if shared:
        raise RewriteError(
            f"model.frozen_dtype: module {sorted(shared)[0]} runs both before and after a tuner",
            hint="leave model.frozen_dtype at float32 for this spec",
        )
    tensors: dict[int, torch.Tensor] = {}
    for path in cast_modules:
        for t in (*gm.get_submodule(path).parameters(), *gm.get_submodule(path).buffers()):
            tensors[id(t)] = t
    for n in low:
        if n.op == "get_attr" and all(u in low_set for u in n.users):
            t = _attr(gm, str(n.target))
            if isinstance(t, torch.Tensor):
                tensors[id(t)] = t
    count = 0
    for t in tensors.values():
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
            count += 1
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "output" and node not in low_set:
            users = [u for u in node.users if u in low_set]
            if users:
                with graph.inserting_after(node):
                    c = graph.call_function(to_dtype, (node, dtype))
                for u in users:
                    u.replace_input_with(node, c)
        elif node in low_set:
            readers = [u for u in node.users if u not in low_set and not _reads_low(gm, u)]
            if readers:
                with graph.inserting_after(node):
                    c = graph.call_function(to_dtype, (node, torch.float32))
                for u in readers:
                    u.replace_input_with(node, c)
    graph.lint()
    gm.recompile()
    return count


def _joins(gm: fx.GraphModule, user: fx.Node, grad: set[fx.Node]) -> bool:
    """``user`` is a tuner's join or module that needs float32 values (not a side step that casts itself)."""
    return "utune_rule" in user.meta and user in grad and not _reads_low(gm, user)


def _reads_low(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and bool(getattr(gm.get_submodule(str(node.target)), "reads_low_precision", False))


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

"""Sites: every module call and functional call of a traced graph, under a stable dotted name.

- a leaf module call (``blocks.3.attn.qkv``): op ``module``;
- a traced-through module (``blocks.3.attn``, ``blocks.3``): op ``composite``; its nodes are those whose
  ``nn_module_stack`` contains its path, its inputs the values they read from outside, its output
  the value used outside;
- a functional call (``blocks.3.attn::scaled_dot_product_attention``): op ``function`` or ``method``,
  named after the innermost enclosing module and the op, ``_1``, ``_2``... when repeated there;
- a Linear/Conv that exists but is never called as a module (BEiT's ``qkv`` read by ``F.linear``,
  ``nn.MultiheadAttention`` internals): op ``uncalled``; it is listed so nothing is skipped silently.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from utune.graph.trace import LEAF_TYPES

# plumbing and shape checks, not operations on activations: not sites
_SKIP_FUNCTIONS: set[Any] = {
    getattr,
    operator.getitem,
    torch._assert,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.mod,
    operator.floordiv,
    operator.not_,
    operator.truth,
}
_SKIP_NAMES = {"_assert", "_assert_is_none", "assert_is_none", "size", "dim"}


@dataclass
class Site:
    path: str
    op: str  # module | composite | function | method | uncalled
    type: str  # class name for modules, op name for functional calls
    module: nn.Module | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    reason: str = ""  # for uncalled sites: why no tuner can attach as a module

    @property
    def enclosing(self) -> str:
        """The module path that contains this site (itself for module sites)."""
        return self.path.split("::")[0] if "::" in self.path else self.path

    @property
    def params(self) -> int:
        """Own parameters: of the module (recursively) or none for functional calls."""
        if self.module is None or self.op == "uncalled":
            return 0
        return sum(p.numel() for p in self.module.parameters())

    @property
    def n_outputs(self) -> int:
        """How many values leave the site (a tuner joins sites with exactly one)."""
        return len(self.outputs)

    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of the site's (first) input, as traced."""
        node = self.input
        meta = node.meta.get("tensor_meta") if node is not None else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    @property
    def output(self) -> fx.Node | None:
        return self.outputs[0] if len(self.outputs) == 1 else None

    @property
    def input(self) -> fx.Node | None:
        return self.inputs[0] if self.inputs else None

    def shape(self) -> tuple[int, ...] | None:
        node = self.output
        meta = node.meta.get("tensor_meta") if node is not None else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def mro_names(self) -> set[str]:
        if self.module is None:
            return {self.type}
        return {c.__name__ for c in type(self.module).__mro__} | {
            f"{c.__module__}.{c.__qualname__}" for c in type(self.module).__mro__
        }


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target: Any = node.target
    return getattr(target, "__name__", str(target)).strip("_") or str(target)


def _is_plumbing(node: fx.Node) -> bool:
    try:
        if node.target in _SKIP_FUNCTIONS:
            return True
    except TypeError:  # unhashable target
        pass
    return _op_name(node) in _SKIP_NAMES or str(node.target) in _SKIP_NAMES


def _stack_paths(node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first (fx records them while tracing)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [qual for qual, _ in stack.values()] if stack else []


def _value_nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []

    def keep(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg(args, keep)
    return found


def _boundary(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    inside = set(nodes)
    inputs: list[fx.Node] = []
    outputs: list[fx.Node] = []
    for n in nodes:
        for a in _value_nodes((n.args, n.kwargs)):
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
        if any(u not in inside for u in n.users) and n not in outputs:
            outputs.append(n)
    return inputs, outputs


def find_sites(gm: fx.GraphModule, model: nn.Module | None = None) -> dict[str, Site]:
    """All sites of ``gm`` in graph order. ``model`` (default ``gm``) resolves composite modules."""
    root = model if model is not None else gm
    sites: dict[str, Site] = {}
    composite_nodes: dict[str, list[fx.Node]] = {}
    fn_counts: dict[tuple[str, str], int] = {}
    called: set[str] = set()
    for node in gm.graph.nodes:
        stack = _stack_paths(node)
        if node.op == "call_module":
            path = str(node.target)
            called.add(path)
            if path in sites:  # a module called twice: number the later calls
                k = sum(1 for p in sites if p.startswith(path + "@")) + 1
                path = f"{path}@{k}"
            mod = gm.get_submodule(str(node.target))
            sites[path] = Site(path, "module", type(mod).__name__, mod, [node], _value_nodes(node.args), [node])
            stack = [s for s in stack if s != str(node.target)]
        elif node.op in ("call_function", "call_method") and not _is_plumbing(node):
            encl = stack[-1] if stack else ""
            op = _op_name(node)
            k = fn_counts.get((encl, op), 0)
            fn_counts[(encl, op)] = k + 1
            path = f"{encl}::{op}" + (f"_{k}" if k else "")
            kind = "function" if node.op == "call_function" else "method"
            sites[path] = Site(path, kind, op, None, [node], _value_nodes((node.args, node.kwargs)), [node])
        for p in stack:
            if p:
                composite_nodes.setdefault(p, []).append(node)
    for path, nodes in composite_nodes.items():
        if path in called:  # a leaf's buffer read while its call was traced carries the leaf's path: not a composite
            continue
        try:
            owner: nn.Module | None = root.get_submodule(path)
        except AttributeError:
            owner = None
        inputs, outputs = _boundary(nodes)
        sites[path] = Site(
            path, "composite", type(owner).__name__ if owner is not None else "?", owner, nodes, inputs, outputs
        )
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    _add_uncalled(root, sites, called, read)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def key(kv: tuple[str, Site]) -> tuple[int, int]:
        site = kv[1]
        return (order[site.nodes[0]] if site.nodes else 1 << 30, site.path.count("."))

    return dict(sorted(sites.items(), key=key))


def _add_uncalled(root: nn.Module, sites: dict[str, Site], called: set[str], read: set[str]) -> None:
    """Leaf-type layers never called as modules: reported, never silently skipped."""
    for name, mod in root.named_modules():
        if not name or name in called or not isinstance(mod, LEAF_TYPES) or isinstance(mod, nn.Dropout):
            continue
        if any(name.startswith(c + ".") for c in called):
            owner = next(c for c in called if name.startswith(c + "."))
            reason = f"its weights are used inside the module call {owner} ({type(root.get_submodule(owner)).__name__})"
        elif any(r.startswith(name + ".") for r in read):
            parent = name.rpartition(".")[0]
            reason = f"{parent or 'the model'} reads its weights directly (e.g. F.linear(x, self.qkv.weight))"
        else:
            reason = "its weights are read directly by the enclosing module, or it is never used in forward"
        sites[name] = Site(name, "uncalled", type(mod).__name__, mod, reason=reason)

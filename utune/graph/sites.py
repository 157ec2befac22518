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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from utune.errors import SelectionError
from utune.graph.trace import LEAF_TYPES, PORTS

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
    # traced-through modules: the values ``forward`` took and returned, by position (None: not a graph value)
    args: list[fx.Node | None] = field(default_factory=list)
    returns: list[fx.Node | None] = field(default_factory=list)

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

    def port(self, output: int | None, input: int | None = None) -> Site:  # noqa: A002 (the rule's key)
        """This site narrowed to one returned value (``output``: its position in what ``forward`` returns) and
        one input (``input``: its position among ``forward``'s arguments; default: the same position as
        ``output`` when ``forward`` takes several tensors, else its one input)."""
        returns = self._returned()
        outputs = self.outputs
        if output is not None:
            if output >= len(returns):
                raise SelectionError(
                    f"{self.path} returns {len(returns)} value(s); there is no output {output}",
                    hint=f"use output: 0 to {len(returns) - 1}" if len(returns) > 1 else "drop `output` from the rule",
                )
            chosen = returns[output]
            if chosen is None or "tensor_meta" not in chosen.meta:
                raise SelectionError(f"output {output} of {self.path} is not a tensor", hint="pick another output")
            if chosen not in self.outputs:
                raise SelectionError(
                    f"output {output} of {self.path} is one of its inputs, returned unchanged: a tuner cannot join it "
                    "there",
                    hint="pick an output the module computes, or attach to the module that makes this value",
                )
            outputs = [chosen]
        if input is None and not self.inputs:  # nothing to read: a tuner that taps the output still can
            return replace(self, outputs=outputs)
        inputs = [self._input_at(input if input is not None else output, explicit=input is not None), *self.inputs]
        return replace(self, outputs=outputs, inputs=list(dict.fromkeys(inputs)))

    def _returned(self) -> list[fx.Node | None]:
        """The returned values by position; a leaf module or op returning a tuple: its ``getitem`` readers."""
        if self.returns:
            return self.returns
        if len(self.outputs) == 1 and "tensor_meta" not in self.outputs[0].meta:
            items = {u.args[1]: u for u in self.outputs[0].users if u.target is operator.getitem}
            index = {i: u for i, u in items.items() if isinstance(i, int)}
            if index and len(index) == len(items):
                return [index.get(i) for i in range(max(index) + 1)]
        return list(self.outputs)

    def _input_at(self, position: int | None, explicit: bool) -> fx.Node:
        """The input that goes with a port: argument ``position`` of ``forward``, or its one tensor input."""
        tensors = [a for a in (self.args or self.inputs) if a is not None and a in self.inputs]
        if not explicit and (position is None or len(tensors) == 1) and tensors:
            return tensors[0]
        chosen = self.args[position] if position is not None and position < len(self.args) else None
        if chosen is not None and chosen in self.inputs:
            return chosen
        if explicit:
            raise SelectionError(
                f"argument {position} of {self.path}'s forward is not a tensor it reads",
                hint=f"it reads {len(tensors)} tensor input(s); count the arguments of its forward from 0",
            )
        raise SelectionError(
            f"{self.path} takes {len(tensors)} tensors and its argument {position} is not one of them: which input "
            f"goes with output {position}?",
            hint="say it with `input: N` in the rule (N counts the arguments of its forward from 0)",
        )

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
    _add_ports(gm, sites)
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    _add_uncalled(root, sites, called, read)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def key(kv: tuple[str, Site]) -> tuple[int, int]:
        site = kv[1]
        return (order[site.nodes[0]] if site.nodes else 1 << 30, site.path.count("."))

    return dict(sorted(sites.items(), key=key))


def _add_ports(gm: fx.GraphModule, sites: dict[str, Site]) -> None:
    """Traced-through modules: what ``forward`` took and returned, by position; inputs in argument order."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for path, (args, returns) in gm.meta.get(PORTS, {}).items():
        site = sites.get(path)
        if site is None or site.op != "composite":
            continue
        site.args = [nodes.get(a) if a else None for a in args]
        site.returns = [nodes.get(r) if r else None for r in returns]
        first = [a for a in site.args if a is not None and a in site.inputs]
        site.inputs = list(dict.fromkeys([*first, *site.inputs]))


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

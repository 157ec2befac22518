"""Where a timm model's ``forward_features`` ends and ``forward_head`` begins, in the rewritten graph.

timm's ``forward`` is ``forward_head(forward_features(x))``, but fx records no node for a method
call: the boundary exists only in Python. So the base model is traced once more while the two calls
are watched (:func:`utune.graph.trace.trace_calls`), which names the node ``forward_features``
returns and the head nodes that read it. fx names nodes in call order, so the same nodes carry the
same names in the rewritten graph (checked: op and target, node by node). There, whatever those head
nodes read now (the node itself, a tuner's value that replaced it, a side network's output) is the
tuned features: everything a tuner does before the head is in it.

Each part is then a graph of its own, the ancestors of its output cut at the features, generated as
a function of the tuned model (``fn(model, x)``) so it reads the model's current modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from utune.errors import TunedModelError
from utune.graph.trace import trace_calls
from utune.models import classifier_names

FEATURES, HEAD = "forward_features", "forward_head"


@dataclass(frozen=True)
class Split:
    """Node names of the rewritten graph: the tuned features and what the classifier reads."""

    features: str
    pre_logits: str | None  # None: no classifier call (an Identity head), the logits are the pre-logits
    pre_logits_error: str | None = None  # why ``pre_logits=True`` cannot be served, when it cannot


def _no(why: str) -> TunedModelError:
    return TunedModelError(why, hint="call the tuned model itself; the split needs forward = head(features(x))")


def _target(n: fx.Node) -> str:
    # tensor constants are numbered per tracer instance: compare their presence, not their names
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", str(n.target))


def _boundary(graph: fx.Graph, calls: dict[str, list[tuple[Any, ...]]]) -> fx.Node:
    """The node ``forward_features`` returns, checked to be what ``forward`` hands to ``forward_head``."""
    ff, fh = calls[FEATURES], calls[HEAD]
    if len(ff) != 1 or len(fh) != 1:
        raise _no(f"forward calls {FEATURES} {len(ff)} and {HEAD} {len(fh)} times, not once each")
    out = ff[0][2]
    args, kwargs, head_out = fh[0]
    if not isinstance(out, fx.Proxy) or not args or args[0] is not out:
        raise _no(f"forward does not pass {FEATURES}' output straight to {HEAD}")
    if kwargs.get("pre_logits") or (len(args) > 1 and args[1] is True):
        raise _no(f"forward asks {HEAD} for pre-logits")
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(head_out, fx.Proxy) or output.args[0] is not head_out.node:
        raise _no(f"forward does not return {HEAD}' output as it is")
    return out.node


def _match(rewritten: fx.Graph, traced: fx.Graph) -> dict[str, fx.Node]:
    """Rewritten nodes by name, checked to hold every traced node under its name."""
    by_name = {n.name: n for n in rewritten.nodes}
    for n in traced.nodes:
        m = by_name.get(n.name)
        if m is None or m.op != n.op or _target(m) != _target(n):
            raise _no(f"the tuned graph does not match a new trace of the base model at node {n.name}")
    return by_name


def _leaves(n: fx.Node) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate((n.args, n.kwargs), lambda a: out.append(a))
    return out


def _standing_for(old: fx.Node, by_name: dict[str, fx.Node]) -> fx.Node:
    """What the head nodes that read ``old`` in the base's graph read in the rewritten one."""
    values: dict[str, fx.Node] = {}
    for reader in old.users:
        now = by_name[reader.name]
        before, after = _leaves(reader), _leaves(now)
        if len(before) != len(after):
            raise _no(f"a tuner changed the arguments of {reader.name}, the head's reader of the features")
        for a, b in zip(before, after, strict=True):
            if a is old and isinstance(b, fx.Node):
                values[b.name] = b
            elif a is old:
                raise _no(f"{reader.name} no longer reads a value where it read the features")
    if len(values) != 1:
        found = ", ".join(values) or "none"
        raise _no(f"the head does not read one value where it read the features ({found})")
    return next(iter(values.values()))


def ancestors(outputs: Any, stop: fx.Node | None = None) -> set[fx.Node]:
    """Nodes ``outputs`` (a node or a structure of them) depend on, not looking past ``stop``."""
    seen: set[fx.Node] = set()
    todo: list[fx.Node] = []
    fx.node.map_arg(outputs, todo.append)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not stop:
            todo.extend(n.all_input_nodes)
    return seen


def extract(graph: fx.Graph, outputs: Any, cut: fx.Node | None = None) -> fx.Graph:
    """A graph computing ``outputs``: from the graph's inputs, or from ``cut`` as its one input."""
    needed = ancestors(outputs, stop=cut)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if cut is not None:
        env[cut] = g.placeholder("x")
    for n in graph.nodes:
        if n not in needed or n in env:
            continue
        if cut is not None and n.op == "placeholder":
            raise _no(f"the head reads the model's input ({n.name}), not only the features: a tuner joins across")
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(fx.node.map_arg(outputs, lambda a: env[a]))
    return g


def _pre_logits(graph: fx.Graph, features: fx.Node, base: nn.Module) -> tuple[str | None, str | None]:
    """The value the classifier reads (its first call after the features), as ``Split.pre_logits*``."""
    names = classifier_names(base)
    output = next(n for n in graph.nodes if n.op == "output")
    head = ancestors(output.args[0], stop=features)
    for n in graph.nodes:
        if n in head and n.op == "call_module" and "utune_rule" not in n.meta:
            if any(n.target == c or str(n.target).startswith(c + ".") for c in names):
                arg = n.args[0] if n.args else None
                if isinstance(arg, fx.Node):
                    return arg.name, None
                break
    if names and all(isinstance(_get(base, c), nn.Identity) for c in names):
        return None, None
    return None, f"no call of the classifier ({', '.join(names) or 'none found'}) reads the features"


def _get(root: nn.Module, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_split(gm: fx.GraphModule, base: nn.Module) -> Split:
    """The features/head split of ``gm``, the rewritten graph of ``base``; TunedModelError says why not."""
    if not all(callable(getattr(base, m, None)) for m in (FEATURES, HEAD)):
        raise _no(f"{type(base).__name__} has no {FEATURES} and {HEAD}")
    try:
        traced, calls = trace_calls(base, (FEATURES, HEAD))
    except Exception as e:  # the model traced once already; anything here is a model we cannot watch
        raise _no(f"tracing {type(base).__name__} again failed: {type(e).__name__}: {e}") from e
    old = _boundary(traced, calls)
    by_name = _match(gm.graph, traced)
    features = _standing_for(old, by_name)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    extract(gm.graph, output.args[0], cut=features)  # the head must read nothing else of the features part
    return Split(features.name, *_pre_logits(gm.graph, features, base))


def compile_graph(graph: fx.Graph, label: str) -> Callable[..., Any]:
    """``graph`` as a function ``fn(root, *inputs)``, its code generated by fx as for a GraphModule."""
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<utune {label}>", "exec"), scope)  # fx's own generated code, as GraphModule runs it
    return scope["forward"]

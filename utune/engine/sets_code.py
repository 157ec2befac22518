"""Several tuner sets' graphs as one generated forward (:meth:`utune.engine.sets.TunerSets.forward_sets`).

The sets' graphs are copies of one traced backbone with each set's tuners attached, so a node no set's
tuners reach has the same name and the same value in every graph (:func:`utune.engine.sets._untouched`). This pass
copies the nodes of K graphs into one ``fx.Graph``: each shared node once (by name), each set's own nodes
once per set, reading the shared values they need (narrowed to the set's rows when the sets run on
different rows of one batch), and returns the K outputs as a tuple. ``recompile`` turns it into plain Python
code: no per-node interpreter, so one set costs what the set's own forward costs, and K sets pay the
shared part once.

Every op is the op of the set's own graph, on the same inputs, so the results equal the interpreter's bit
for bit; only the order in which independent values are computed may differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import fx

from utune.graph.split import compile_graph

ROWS = "rows_"  # the placeholder prefix of each set's row slice


@dataclass
class SharedSets:
    """The generated forward of K sets: ``fn(roots, *inputs, rows_0=..., ...)``; ``roots.s<i>`` is set i's
    GraphModule itself, so the code reads its modules and tensors live (a new head, weights moved to a
    device), as the set's own forward does, and nothing is registered or copied."""

    graph: fx.Graph
    fn: Callable[..., Any]
    roots: SimpleNamespace

    @property
    def code(self) -> str:
        return str(self.graph.python_code(root_module="self").src)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.roots, *args, **kwargs)


def compile_sets(
    graphs: Sequence[fx.GraphModule],
    shared: Sequence[frozenset[str]],
    rows: Sequence[tuple[bool, Mapping[str, Any]]] | None = None,
) -> SharedSets:
    """One generated function computing every graph's output from one input; ``shared[i]``: the names of graph i's
    nodes whose value any graph may reuse (its untouched nodes and placeholders).

    ``rows``: per graph, ``(narrow, dims)``; the generated forward then takes graph i's row slice as the
    keyword ``rows_i``. With ``narrow`` the shared values graph i's own nodes read are narrowed to its rows
    (``dims``: the batch dim of each value, :func:`utune.graph.batch.batch_dims`); without, the graph runs on
    the whole batch and its output is narrowed.
    """

    g = fx.Graph()
    values: dict[str, fx.Node] = {}  # a shared node's name -> its node in g
    inputs = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    for n in inputs:
        values[n.name] = g.node_copy(n)
    # after the graphs' own inputs (some with defaults): passed by keyword, ``rows_0=slice(...)``
    row_args = [g.placeholder(f"{ROWS}{i}", default_value=None) for i in range(len(graphs))] if rows else []
    outs: list[Any] = []
    for i, gm in enumerate(graphs):
        narrow, dims = rows[i] if rows is not None else (False, {})
        own: dict[fx.Node, fx.Node] = {}
        narrowed: dict[str, fx.Node] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

        def read(a: fx.Node, i: int = i, own: dict[fx.Node, fx.Node] = own, narrowed: dict[str, fx.Node] = narrowed,
                 narrow: bool = narrow, dims: Mapping[str, Any] = dims) -> fx.Node:  # fmt: skip
            if a in own:
                return own[a]
            if not narrow or dims.get(a.name) is None:  # _narrow would return the value itself
                return values[a.name]
            if a.name not in narrowed:
                narrowed[a.name] = g.call_function(_narrow, (values[a.name], dims.get(a.name), row_args[i]))
            return narrowed[a.name]

        for pos, n in enumerate(placeholders):  # a graph's inputs: the first graph's, by position
            values.setdefault(n.name, values[inputs[pos].name])
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = fx.node.map_arg(n.args[0], read)
                if rows is not None and not narrow:
                    out = g.call_function(_rows_of, (out, row_args[i]))
                outs.append(out)
                continue
            if n.name in shared[i]:
                if n.name not in values:  # its inputs are shared too: already in ``values``
                    values[n.name] = _copy(g, n, lambda a: values[a.name], i)
                continue
            own[n] = _copy(g, n, read, i)
    g.output(tuple(outs))
    g.lint()
    roots = SimpleNamespace(**{f"s{i}": gm for i, gm in enumerate(graphs)})
    return SharedSets(g, compile_graph(g, "forward_sets"), roots)


def _copy(g: fx.Graph, n: fx.Node, arg: Any, i: int) -> fx.Node:
    new = g.node_copy(n, arg)
    if n.op in ("call_module", "get_attr"):
        new.target = f"s{i}.{n.target}"
    new.meta = dict(n.meta)
    return new


def _narrow(value: Any, dim: Any, rows: slice | None) -> Any:
    from utune.graph.batch import BATCH_SIZE

    if rows is None or dim is None:
        return value
    n = rows.stop - rows.start
    if isinstance(dim, int) and not isinstance(dim, bool) and isinstance(value, torch.Tensor):
        return value.narrow(dim, rows.start, n)
    if dim == BATCH_SIZE:
        return n
    if isinstance(dim, tuple):  # a shape holding the batch size at these positions
        sizes = [n if i in dim else v for i, v in enumerate(value)]
        return torch.Size(sizes) if isinstance(value, torch.Size) else type(value)(sizes)
    return value


def _rows_of(out: Any, rows: slice) -> Any:
    if isinstance(out, torch.Tensor):
        return out[rows]
    if isinstance(out, tuple | list):
        return type(out)(_rows_of(o, rows) for o in out)
    return out

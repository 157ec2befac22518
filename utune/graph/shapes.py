"""Shape propagation: run a graph on a dummy batch and record each node's output shape in its meta.

By default the graph runs on the meta device: every parameter, buffer and tensor attribute is swapped for a
meta tensor of the same shape, dtype and strides for the length of the run, so no arithmetic is done (a
ViT-B/16 propagates in tens of milliseconds instead of seconds). A graph that cannot run on meta (an op with
no meta kernel, a value read with ``.item()``, a tensor created on the CPU inside a leaf) is run again for
real, and so is one that fails on meta, so that a real failure is reported with the real error. torch.fx's
ShapeProp prints a traceback on failure; this one raises :class:`NodeFailure`, naming the node, so the caller
can turn it into one clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from utune._reference import reference_build


class NodeFailure(RuntimeError):
    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(f"node {node.name}: {type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise NodeFailure(n, e) from e
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        else:
            n.meta.pop("tensor_meta", None)
        return result


def _meta_like(t: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """A meta tensor with ``t``'s shape, strides and dtype (a Parameter stays a Parameter); one per tensor, so
    tied tensors stay tied."""
    if t.device.type == "meta":
        return t
    if id(t) not in memo:
        m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return memo[id(t)]


@contextmanager
def on_meta(root: nn.Module) -> Iterator[None]:
    """Every tensor of ``root``'s modules (parameters, buffers, tensor attributes such as fx's constants) is a
    meta tensor inside the block and the real one again after it."""
    memo: dict[int, torch.Tensor] = {}
    undo: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for m in root.modules():
            tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers, m.__dict__)
            for table in tables:
                for name, t in list(table.items()):
                    if isinstance(t, torch.Tensor) and (table is not m.__dict__ or not isinstance(t, nn.Parameter)):
                        undo.append((table, name, t))
                        table[name] = _meta_like(t, memo)
        yield
    finally:
        for table, name, t in reversed(undo):
            table[name] = t


def _run(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    was = gm.training
    gm.eval()
    try:
        return _ShapeInterpreter(gm).run(example)
    finally:
        gm.train(was)


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor, *, real: bool = False) -> Any:
    """Record output shapes of every node of ``gm`` on ``example`` (eval mode, no grad).

    On the meta device unless ``real``; a meta run that fails is repeated for real (the real error, if any, is
    the one raised). Returns the graph's output: a meta value unless the graph ran for real.
    """
    if not real and not reference_build():
        try:
            with on_meta(gm):
                return _run(gm, example.to("meta"))
        except NodeFailure as e:
            # no meta kernel, a data-dependent value, or a real shape error: a real run tells which; a model
            # that lives on meta (``utune inspect``) cannot run for real, so its meta failure stands
            if any(t.device.type == "meta" for t in (*gm.parameters(), *gm.buffers())):
                raise e
    return _run(gm, example)

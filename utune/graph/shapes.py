"""Shape propagation: run a graph on a dummy batch and record each node's output shape in its meta.

torch.fx's ShapeProp prints a traceback on failure; this one raises :class:`NodeFailure`, naming
the node, so the caller can turn it into one clear error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata


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


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    """Record output shapes of every node of ``gm`` on ``example`` (eval mode, no grad)."""
    was = gm.training
    gm.eval()
    try:
        return _ShapeInterpreter(gm).run(example)
    finally:
        gm.train(was)

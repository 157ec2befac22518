"""Which dim of each value of a graph is the batch, found by running the graph on two batch sizes on meta.

A multi-task step (:mod:`utune.engine.sets`) runs the shared backbone once on the tasks' batches concatenated and
each task's own tuners on its rows only. That needs, for every value a task reads from the shared part, the
dim that holds the batch (to take the task's rows), and every size that *is* the batch size (``B`` in
``x.reshape(B, N, 3, H, D)``, to become the task's row count). Sizes are not guessed: the graph runs on the
meta device at batch 2 and at batch 3, and a dim (or an int) that reads 2 in the first run and 3 in the second
is the batch. A value whose batch is folded into another dim (``(B * N, C)``) is :data:`UNKNOWN`: the caller
then runs that task on the whole batch and takes its rows from the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
from torch import fx

from utune.graph.shapes import on_meta

NO_BATCH: Final = "no batch"  # the same in both runs (a parameter-derived tensor, a size that is not B)
UNKNOWN: Final = "unknown"  # changes with the batch, but not as one dim of its own
BATCH_SIZE: Final = "batch size"  # an int that is the batch size
BatchDim = int | str | tuple[int, ...]  # a tensor's batch dim, a shape's batch positions, or one of the above
SIZES: Final = (2, 3)


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, bool):
        return ("other", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, tuple | list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ("ints", tuple(value))
    return ("other", None)  # tuples of tensors are read through getitem nodes, which have their own


class _Record(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.seen[n.name] = _signature(value)
        return value


def _changed(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def _classify(first: Any, second: Any) -> BatchDim:
    kind, a = first
    if kind != second[0] or kind == "other":
        return NO_BATCH if first == second else UNKNOWN
    if kind == "int":
        return BATCH_SIZE if (a, second[1]) == SIZES else NO_BATCH if a == second[1] else UNKNOWN
    b = second[1]
    if len(a) != len(b):
        return UNKNOWN
    moved = _changed(a, b)
    if any((a[i], b[i]) != SIZES for i in moved):
        return UNKNOWN
    if kind == "ints":  # a shape: the positions holding the batch size
        return tuple(moved) if moved else NO_BATCH
    return moved[0] if len(moved) == 1 else NO_BATCH if not moved else UNKNOWN


@torch.no_grad()
def batch_dims(gm: fx.GraphModule, input_size: Sequence[int]) -> dict[str, BatchDim] | None:
    """For every node of ``gm`` (placeholders included): the dim of its tensor that is the batch; for an int,
    :data:`BATCH_SIZE` when it is the batch size; for a shape (tuple of ints), the positions holding it;
    :data:`NO_BATCH` or :data:`UNKNOWN` otherwise. None when the graph cannot run on meta."""
    runs = []
    was = gm.training
    gm.eval()
    try:
        with on_meta(gm):
            for b in SIZES:
                rec = _Record(gm)
                rec.run(torch.zeros(b, *input_size, device="meta"))
                runs.append(rec.seen)
    except Exception:
        return None
    finally:
        gm.train(was)
    return {name: _classify(runs[0][name], runs[1][name]) for name in runs[0]}

"""Peak training memory of a model, measured as the bytes of live tensor storage during training steps.

Why not the process's peak RSS: for the small models ``utune compare`` runs on a CPU, RSS is dominated by
the runtime (torch, timm and their libraries: about 400 MB) and by the allocator's caching, the same for
every method, so methods a few MB apart all read as 1.00. What a method changes is the tensors a training
step keeps alive: the parameters, the activations saved for the backward pass, the gradients and the
optimizer's state. A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every tensor every op
creates (forward, backward and optimizer ops alike); the storages are tracked by weak reference, so the
count falls when a tensor is freed. The peak is exact for the storages' sizes (no allocator rounding or
caching), deterministic, and independent of other jobs on the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Counts live tensor-storage bytes: those of ``existing`` tensors plus every op output since entry."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        for tensor in existing:
            self._track(tensor)
        self.peak = self.current

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def _is_new(self, storage: torch.UntypedStorage) -> bool:
        known = self.live.get(storage._cdata)
        return known is None or known[0].expired()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        known = self.live.get(storage._cdata)
        if known is not None and not known[0].expired():
            return
        if known is not None:  # that address was freed and reused
            self.current -= known[1]
        self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.current += storage.nbytes()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and self._is_new(t.untyped_storage())]
        if fresh:  # only an allocation can raise the peak: account for every free before it, then add it
            self._sweep()
            for tensor in fresh:
                self._track(tensor)
            self.peak = max(self.peak, self.current)
        return out


def peak_training_bytes(model: torch.nn.Module, step: Callable[[], None], steps: int = 2) -> int:
    """The peak of live tensor bytes over ``steps`` calls of ``step`` (a forward, backward and optimizer
    update of ``model``), counting the model's parameters and buffers from the start."""
    existing = [*model.parameters(), *model.buffers()]
    with PeakTensorMemory(existing) as meter:
        for _ in range(steps):
            step()
    return meter.peak

"""Create a model on the meta device without changing what the seeded RNG draws next.

A model whose weights all come from a file does not need timm's weight init (~1.5 s for ViT-B/16): it is
created on the meta device, given empty CPU memory, its computed (non-persistent) buffers are filled again by
timm's ``init_non_persistent_buffers``, and the file is copied in. But ``utune.build`` seeds one RNG stream
for the backbone's init *and then* the tuners' init, so skipping the backbone's draws would change every
tuner's initial values. :class:`ReplayDraws` keeps the stream: every random op the init runs on a meta
tensor is run once more on a real scratch tensor of the same shape, strides and dtype, drawing exactly the
numbers the real init would have drawn (~0.3 s of the 1.5 s for ViT-B/16; the rest, the arithmetic of
truncated normals and the first touch of the memory, is skipped).

That only holds if the init runs the same code on meta as for real. Init code may test for meta and skip
its draws (torch 2.14's ``nn.init.trunc_normal_`` returns at once on meta), which no replay could see; so
:class:`QuietMeta` puts new tensors on meta while every tensor *says* it is on the CPU (``is_meta``,
``.device``, ``torch.get_default_device()``). The init then runs its real code, and code whose draws depend
on values (the same ``trunc_normal_`` is a rejection sampler: ``while mask.any()``) fails on a meta tensor
instead of silently drawing less, as does any seeded op not known to draw by shape alone
(:class:`NotReplayable`). The caller then creates the model for real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

# seeded ops whose number of draws depends only on shapes, dtypes and scalar arguments (not on tensor values:
# rejection samplers such as poisson or multinomial are left out)
_REPLAYABLE = {
    "uniform_",
    "normal_",
    "normal",
    "bernoulli_",
    "bernoulli",
    "random_",
    "exponential_",
    "cauchy_",
    "log_normal_",
    "geometric_",
    "rand",
    "randn",
    "randint",
    "randperm",
    "rand_like",
    "randn_like",
    "randint_like",
}
_IS_META = torch._C.TensorBase.is_meta
_DEVICE = torch._C.TensorBase.device
_CPU = torch.device("cpu")


class NotReplayable(RuntimeError):
    """The init ran a seeded op on meta whose draws cannot be replayed from shapes alone."""


def _is_meta(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and _DEVICE.__get__(v).type == "meta"


class QuietMeta(TorchFunctionMode):
    """Factories without a device make meta tensors (as ``torch.device("meta")`` does), and no tensor tells
    it is on meta: the init takes the code path it takes on the CPU."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is _IS_META:
            return False
        if owner is _DEVICE:
            device = func(*args, **kwargs)
            return _CPU if device.type == "meta" else device
        if func is torch.get_default_device:
            return _CPU
        if func in _device_constructors() and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


class ReplayDraws(TorchDispatchMode):
    """Inside the block, each seeded op on the meta device is run again on real scratch memory."""

    def __init__(self) -> None:
        super().__init__()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def _real(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU view with ``t``'s shape, strides and dtype into a reused buffer (contents: garbage)."""
        size = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
        buf = self._scratch.get(t.dtype)
        if buf is None or buf.numel() < size:
            buf = self._scratch[t.dtype] = torch.empty(max(size, 1), dtype=t.dtype, device=_CPU)
        return buf.as_strided(t.shape, t.stride())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return out
        device = kwargs.get("device")
        on_meta = any(_is_meta(a) for a in (*args, *kwargs.values())) or (
            device is not None and torch.device(device).type == "meta"
        )
        if not on_meta:
            return out  # it ran on a real device: it drew its numbers already
        if func.overloadpacket.__name__ not in _REPLAYABLE:
            raise NotReplayable(f"{func} cannot be replayed on the CPU from shapes alone")
        real_kwargs = {**kwargs, "device": _CPU} if device is not None else kwargs
        func(*tree_map(lambda a: self._real(a) if _is_meta(a) else a, args), **real_kwargs)
        return out


def create_on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` on the meta device, drawing from the RNG what a real ``make()`` draws."""
    with QuietMeta(), ReplayDraws():
        return make()


def _meta_leftovers(model: nn.Module) -> list[str]:
    """Names of tensors still on meta: parameters, buffers and tensor attributes of any module."""
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if _is_meta(t)]
    for path, m in model.named_modules():
        for k, v in m.__dict__.items():
            values = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else [v]
            if k not in ("_parameters", "_buffers") and any(_is_meta(t) for t in values):
                left.append(f"{path}.{k}" if path else k)
    return left


def covers(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds every state-dict key of ``model``, each at its shape, and nothing else."""
    own = model.state_dict(keep_vars=True)
    return set(own) == set(state) and all(own[k].shape == v.shape for k, v in state.items())


def probe(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` on meta with no draws replayed (tens of ms): its keys and shapes, to decide before paying
    for the replay. The RNG is left as it was."""
    with torch.random.fork_rng(devices=[]), QuietMeta():
        return make()


def materialize(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Give a meta ``model`` real CPU tensors: ``state`` (which must hold every state-dict key, at the right
    shape) copied in, and the non-persistent buffers recomputed. False, with ``model`` unusable, when that
    cannot make every tensor real (a computed buffer timm cannot recompute, a tensor attribute, tied
    parameters, whose ties copying per key would not show)."""
    own = model.state_dict(keep_vars=True)
    if not covers(model, state):
        return False
    named = list(model.named_parameters(remove_duplicate=False))
    if len({id(p) for _, p in named}) != len(named):
        return False
    owners = {name.rpartition(".")[0] for name, _ in model.named_buffers() if name not in own}
    if any(not hasattr(model.get_submodule(o), "init_non_persistent_buffers") for o in owners):
        return False
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # the real init computed these before its draws ended
        for m in model.modules():
            init = getattr(m, "init_non_persistent_buffers", None)
            if callable(init):
                init()
    # fresh copies (a file's mapping is not kept: rewriting the file must not change or crash the model)
    model.load_state_dict({k: _copy_like(v, own[k]) for k, v in state.items()}, strict=True, assign=True)
    return not _meta_leftovers(model)


def _copy_like(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` in new memory with ``like``'s dtype and strides: what ``like.copy_(src)`` would hold.

    Same dtype, both contiguous: a single-threaded byte copy through numpy. torch's copy is parallel, and on a
    machine whose cores are busy the parallel copy of a ViT-B/16 (344 MB) waits on descheduled threads: 0.4 s
    instead of 0.12 s measured on the project's 2-core machine.
    """
    if src.dtype == like.dtype and src.is_contiguous() and like.is_contiguous():
        out = torch.empty(src.shape, dtype=src.dtype)
        np.copyto(_bytes(out), _bytes(src.detach()))
        return out
    return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype).copy_(src)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()

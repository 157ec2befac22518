"""Multi-process (DDP) plumbing: process-group setup from torchrun's environment and small collectives.

Every helper works unchanged in a plain single process (no ``torchrun``): rank 0 of a world of 1,
collectives are identities. That keeps the training loop free of ``if distributed`` branches.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from utune.errors import DeviceError, UserInputError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserInputError(
            f"environment variable {name}={value!r} is not an integer", hint=f"unset {name} or set it to a number"
        ) from None


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    """Number of processes taking part in training (1 without torchrun)."""
    return dist.get_world_size() if initialized() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    return dist.get_rank() if initialized() else _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on the one process that writes files and prints (rank 0)."""
    return rank() == 0


def resolve_device(requested: str | None = None) -> torch.device:
    """The device this process trains on: ``requested`` or CUDA when present, one GPU per local rank."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}", hint="set train.device to cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r} is not supported", hint="set train.device to cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available", hint="use train.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)",
                hint="pick an index below that, or set train.device=cuda",
            )
        if device.index is None:
            # Under torchrun every process gets its own GPU; a bare "cuda" means "my GPU".
            device = torch.device("cuda", local_rank() if world() > 1 else torch.cuda.current_device())
    return device


def check_environment(requested_device: str | None = None) -> torch.device:
    """The device and torchrun's environment, checked before anything slow starts (DeviceError if wrong)."""
    device = resolve_device(requested_device)
    if _env_int("WORLD_SIZE", 1) > 1 and not initialized():
        for key in ("RANK", "LOCAL_RANK"):
            _env_int(key, 0)  # a clear error for a value that is not a number
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not os.environ.get(k)]
        if missing:
            raise DeviceError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not",
                hint="start multi-process training with `torchrun --nproc_per_node N -m utune apply ...`, "
                "or unset WORLD_SIZE",
            )
    return device


def setup(requested_device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (idempotent) and return this process's device.

    NCCL when training on CUDA, gloo on CPU. Without ``WORLD_SIZE`` > 1 it only resolves the device.
    """
    device = check_environment(requested_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
    if _env_int("WORLD_SIZE", 1) > 1 and not initialized():
        if not dist.is_available():
            raise DeviceError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds the communicator eagerly; avoids a rank->GPU guess
        try:
            dist.init_process_group(**kwargs)
        except (RuntimeError, ValueError) as e:  # a bad address, a port in use, a rank that never came
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeviceError(
                f"cannot join the {backend} process group at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}: {first}",
                hint="start multi-process training with `torchrun --nproc_per_node N -m utune apply ...`",
            ) from None
    return device


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if not initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (and return it)."""
    if initialized() and world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The largest value over all ranks, in place (and returned)."""
    if initialized() and world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (for small picklable values such as a run dir name)."""
    if not (initialized() and world() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, ordered by rank (a list of one without DDP)."""
    if not (initialized() and world() > 1):
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out

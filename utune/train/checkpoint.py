"""Crash-safe checkpoints of the trainable state.

Layout of ``<run>/checkpoints/``::

    step-00000120/model.safetensors   trainable parameters (+ buffers of modules that own them)
    step-00000120/state.pt            optimizer, scheduler, counters, RNG states, metrics so far
    latest.txt                        "step-00000120": the checkpoint ``--resume`` continues from
    best.txt                          the checkpoint with the best validation accuracy (optional)

A checkpoint is written into ``.tmp-*/`` in the same folder, fsynced, renamed to ``step-N/`` (rename
is atomic and the name did not exist), and only then do the pointer files, themselves replaced
atomically, name it. A SIGKILL at any instant therefore leaves the pointers naming a complete folder.
Folders no pointer names are removed after each save. ``state.pt`` holds only tensors, numbers,
strings, lists and dicts so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from utune._fs import atomic_write, fsync_path, make_dir, storage_error, temp_dir
from utune.errors import CheckpointError
from utune.graph.rewrite import TUNER_ROOT

WEIGHTS = "model.safetensors"
STATE = "state.pt"
TAGS = ("latest", "best")
_STEP_DIR = re.compile(r"^step-\d{8,}$")
_RESUME_HINT = "delete it (or that checkpoint folder) or start the run again without --resume"


# ---- what is saved --------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus persistent buffers of modules that own a trainable parameter and of
    tuner modules (``utune.*``: a frozen shared projection is part of what the tuner is).

    The buffers ride along because a trained module's buffers (e.g. a tuner's BatchNorm statistics)
    belong to what was learned; the frozen backbone's are rebuilt from the base model. A tensor tied into
    several modules (``share:``) is kept once, under the first name it has.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def keep(name: str, tensor: torch.Tensor) -> None:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor.detach()

    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        tuner = mod_name == TUNER_ROOT or mod_name.startswith(TUNER_ROOT + ".")
        if not own and not tuner:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in own:
            keep(prefix + n, p)
        skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
        for n, b in module.named_buffers(recurse=False):
            if b is not None and n not in skip:
                keep(prefix + n, b)
    return out


def load_trainable(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: Path | str) -> None:
    """Copy ``tensors`` into the model's trainable state, strictly by name and shape."""
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            more = ", ..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{more})")
        raise CheckpointError(
            f"{source} does not match the model's trainable tensors: {'; '.join(parts)}",
            hint="rebuild the model from the run's own spec.yaml (same tuners, same dataset/classes)",
        )
    for name, target in expected.items():
        src = tensors[name]
        if src.shape != target.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(src.shape)}, the model expects {tuple(target.shape)}",
                hint="the model or dataset differs from the one trained (e.g. a different number of classes)",
            )
        check_values(src, target, f"{source}: {name}")
    for name, target in expected.items():
        src = tensors[name]
        with torch.no_grad():
            target.copy_(src.to(dtype=target.dtype, device=target.device))


def frozen_fingerprint(model: nn.Module) -> list[float]:
    """[count, sum, sum of squares] of the frozen parameters: a resume onto other base weights shows."""
    count, total, sq = 0, 0.0, 0.0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                d = p.detach().double()
                count += p.numel()
                total += float(d.sum())
                sq += float((d * d).sum())
    return [float(count), total, sq]


def check_frozen(model: nn.Module, state: Mapping[str, Any], folder: Path, *, now: list[float] | None = None) -> None:
    """Refuse to pair a checkpoint with base weights other than those it was trained on (``now``: the model's
    fingerprint, when taken already, e.g. before sharding)."""
    saved = state.get("frozen")
    now = frozen_fingerprint(model) if now is None else now
    if saved is None:
        return
    same = len(saved) == len(now) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(saved, now, strict=True)
    )
    if not same:
        raise CheckpointError(
            f"{folder}: the model's frozen weights differ from those this checkpoint was trained on",
            hint="build the model from the run's spec.yaml with the same base weights "
            "(model.pretrained=false gives random base weights unless model creation is seeded)",
        )


def rng_state() -> dict[str, Any]:
    """This process's RNG streams (torch CPU/CUDA, numpy, random) as weights_only-loadable values."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: reading every GPU's state would create a context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"]), p["gauss"]))


# ---- writing --------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fsync_path(path, strict=True)


def _write_pointer(ckpt_dir: Path, tag: str, target: str) -> None:
    """``latest.txt`` / ``best.txt`` replaced atomically; an OSError reaches save_checkpoint as it is."""
    atomic_write(ckpt_dir / f"{tag}.txt", (target + "\n").encode(), on_error=lambda e: e)


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written temp folder visible under its final name (one atomic rename)."""
    os.replace(tmp, final)
    _fsync_path(final.parent)


def read_pointers(ckpt_dir: Path) -> dict[str, str]:
    out = {}
    for tag in TAGS:
        f = ckpt_dir / f"{tag}.txt"
        if f.is_file():
            out[tag] = f.read_bytes()[:200].decode("utf-8", errors="replace").strip()
    return out


def _prune(ckpt_dir: Path) -> None:
    keep = set(read_pointers(ckpt_dir).values())
    for entry in ckpt_dir.iterdir():
        if entry.name.startswith(".") and ".txt.tmp-" in entry.name and entry.is_file():
            entry.unlink(missing_ok=True)  # a pointer update a crash interrupted
        elif (entry.name.startswith(".tmp-") or _STEP_DIR.match(entry.name)) and entry.name not in keep:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(
    ckpt_dir: Path,
    *,
    step: int,
    weights: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    tags: Iterable[str] = ("latest",),
) -> Path:
    """Write one checkpoint atomically, point ``tags`` at it, drop folders no tag points at.

    A failed write (full disk, no permission) removes its temp folder and raises a StorageError; the
    previous checkpoint and the pointers naming it are untouched.
    """
    tags = list(tags)
    if unknown := set(tags) - set(TAGS):
        raise ValueError(f"unknown checkpoint tags {sorted(unknown)}")
    make_dir(ckpt_dir, "checkpoint folder")
    name = f"step-{step:08d}"
    final = ckpt_dir / name
    try:
        if not (final.is_dir() and name in read_pointers(ckpt_dir).values()):
            # An existing, pointed-at folder for this step is already complete (same step, same content);
            # anything else under that name is the leftover of a crash and is replaced.
            _write_folder(ckpt_dir, final, step, weights, state)
        for tag in tags:
            _write_pointer(ckpt_dir, tag, name)
    except OSError as e:
        prior = read_pointers(ckpt_dir).get("latest")
        intact = f"the previous checkpoint ({prior}) is intact" if prior and prior != name else None
        raise storage_error(e, final, what="checkpoint", intact=intact) from None
    _prune(ckpt_dir)
    return final


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``; its own error type for a failed write becomes the OSError it wraps."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except Exception as e:  # SafetensorError("... I/O error: File too large (os error 27)")
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _write_folder(
    ckpt_dir: Path, final: Path, step: int, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> None:
    tmp = temp_dir(ckpt_dir, ".tmp-")
    try:
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
        _save_tensors(tensors, tmp / WEIGHTS, {"format": "pt", "step": str(step)})
        _fsync_path(tmp / WEIGHTS)
        with open(tmp / STATE, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        _publish(tmp, final)
    except BaseException:  # a full disk, a signal: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading --------------------------------------------------------------------------------------


def check_values(src: torch.Tensor, target: torch.Tensor, what: str) -> None:
    """A loaded tensor must be what the model holds: floats where it holds floats (an int8 or bool tensor
    would be cast silently), and finite (NaN or inf weights compute NaN everywhere, silently)."""
    if target.is_floating_point() and not src.is_floating_point():
        raise CheckpointError(
            f"{what} holds {str(src.dtype).removeprefix('torch.')} values where the model holds "
            f"{str(target.dtype).removeprefix('torch.')}",
            hint="the file was not written by utune or was altered; export or train again",
        )
    if src.is_floating_point() and src.numel() and not bool(torch.isfinite(src).all()):
        bad = int((~torch.isfinite(src)).sum())
        raise CheckpointError(
            f"{what} holds {bad} non-finite value(s) (NaN or inf) of {src.numel()}",
            hint="the training that wrote it diverged, or the file was altered; train again with a lower "
            "train.lr or with train.clip_grad",
        )


def resolve_checkpoint(path: Path, which: str = "latest") -> Path:
    """The checkpoint folder for a run dir, its ``checkpoints/`` dir, or a ``step-N`` folder itself."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = ckpt_dir / f"{which}.txt"
    if not pointer.is_file():
        raise CheckpointError(
            f"no {which!r} checkpoint in {ckpt_dir} ({pointer.name} not found)",
            hint="train first, or start without --resume" if which == "latest" else "use the latest one",
        )
    name = read_pointers(ckpt_dir).get(which, "") if which in TAGS else pointer.read_text(errors="replace").strip()
    if not _STEP_DIR.match(name) or not (ckpt_dir / name).is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder", hint=_RESUME_HINT)
    return ckpt_dir / name


def has_checkpoint(ckpt_dir: Path) -> bool:
    return (ckpt_dir / "latest.txt").is_file()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``model.safetensors`` (CPU); a missing, truncated or corrupt file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing", hint=_RESUME_HINT)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0]})",
            hint=_RESUME_HINT,
        ) from None


def read_state(path: Path) -> dict[str, Any]:
    """The ``state.pt`` dict, loaded with ``weights_only=True``; damage is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing", hint=_RESUME_HINT)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors for truncation, UnpicklingError for foreign objects
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {msg})", hint=_RESUME_HINT
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint file {path} is not a utune training state", hint=_RESUME_HINT)
    return state


def load_checkpoint(path: Path, which: str = "latest") -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(weights, state, folder) of a run's checkpoint; see :func:`resolve_checkpoint` for ``path``."""
    folder = resolve_checkpoint(path, which)
    weights = read_weights(folder / WEIGHTS)
    state = read_state(folder / STATE)
    return weights, state, folder

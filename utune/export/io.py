"""Safe files: atomic writes (temp file in the same folder, fsync, ``os.replace``), no silent overwrites,
and reads that turn a missing, truncated or corrupt safetensors file into one :class:`CheckpointError`.

A write either leaves the complete new file under its name or nothing at all (the old file, if any, is
untouched): the bytes go to ``.<name>.tmp-<pid>`` beside the target, are fsynced, then renamed over it.
A full disk (``ENOSPC``) or any other ``OSError`` removes the temp file and becomes an :class:`ExportError`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from utune._fs import atomic_write, describe, fsync_path, temp_dir
from utune.errors import CheckpointError, ExportError


def check_target(path: Path, force: bool) -> None:
    """Refuse to replace an existing ``path`` unless ``force``, and a parent that cannot be a folder.

    A missing parent folder is fine: the writers create it (and remove it again if the write fails).
    """
    if path.exists() and not force:
        raise ExportError(f"{path} already exists", hint="pass --force to overwrite it, or choose another -o")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {path}: {ancestor} is a file, not a folder", hint="choose another -o")


def _make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders (umask applies); returns them, deepest last."""
    created: list[Path] = []
    for parent in reversed(path.parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as e:
                _remove_empty(created)
                raise _os_error(e, path) from None
            created.append(parent)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break


def _os_error(e: OSError, path: Path) -> ExportError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ExportError(
            f"{describe(e)} while writing {path}; nothing was written",
            hint="free some space or write elsewhere with -o",
        )
    return ExportError(f"cannot write {path}: {describe(e)}", hint="check the folder's permissions and space")


def write_bytes_atomic(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; an existing file is replaced only with ``force``."""
    path = Path(path)
    check_target(path, force)
    if path.is_dir():
        raise ExportError(f"{path} is a folder, not a file", hint="choose a file name ending in .safetensors")
    created = _make_parents(path)
    try:
        atomic_write(path, data, on_error=lambda e: _os_error(e, path))
    except BaseException:
        _remove_empty(created)
        raise


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes: CPU, contiguous copies (shared storage is not allowed by the format)."""
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(cpu, metadata=dict(metadata))


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, force: bool = False
) -> int:
    """Write a safetensors file atomically; returns its size in bytes."""
    data = safetensors_bytes(tensors, metadata)
    write_bytes_atomic(Path(path), data, force=force)
    return len(data)


def publish_dir(path: Path, fill: Callable[[Path], None], *, force: bool = False) -> None:
    """Create folder ``path`` atomically: ``fill(tmp)`` writes into a temp folder beside it, then one rename.

    With ``force`` an existing ``path`` is moved aside first and removed after the new folder is in place.
    """
    path = Path(path)
    check_target(path, force)
    created = _make_parents(path)
    try:
        tmp = temp_dir(path.parent, f".{path.name}.tmp-")
    except OSError as e:
        _remove_empty(created)
        raise _os_error(e, path) from None
    old: Path | None = None
    try:
        fill(tmp)
        for f in tmp.iterdir():
            fsync_path(f, strict=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
        _remove_empty(created)
        raise _os_error(e, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        _remove_empty(created)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    fsync_path(path.parent)


def read_safetensors(path: Path, what: str = "tuner file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file; missing, truncated or corrupt -> CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist", hint="check the path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{what} {path} is truncated or corrupt ({type(e).__name__}: {first})",
            hint="export it again; a copy may have been cut short",
        ) from None
    return tensors, metadata

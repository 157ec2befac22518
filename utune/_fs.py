"""Files utune writes: atomic replacement, folders that follow the umask, and one error for a failed write.

This is the one file-safety module: every file utune writes (checkpoint pointers, metrics, run specs and
summaries, exports, run names) goes through :func:`atomic_write` (a temp file beside the target, fsynced,
one ``os.replace``, the folder fsynced), or, for folders, a temp folder and one rename.

A failed write (full disk, no permission, a file where a folder should be) becomes a
:class:`~utune.errors.StorageError` naming the path and the fix, raised only after the partial file is
removed; what stood under the name before is untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from utune.errors import StorageError, UtuneError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import (os.umask can only be read by setting it)


def folder_mode() -> int:
    return 0o777 & ~UMASK


def describe(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if e.errno == errno.EFBIG:
        return "the file is larger than this process may write (file size limit)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied" if e.errno != errno.EROFS else "the file system is read-only"
    if e.errno == errno.ENOTDIR:
        return "a file stands where a folder should be"
    return e.strerror or str(e)


def storage_error(
    e: OSError, path: Path, *, what: str = "file", intact: str | None = None, cls: type[UtuneError] = StorageError
) -> UtuneError:
    """One clear error for a write that failed; ``intact`` names what is known to be unharmed."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    msg = f"cannot write the {what} {path}: {describe(e)}"
    if intact:
        msg += f"; {intact}"
    hint = (
        "free some space (or write elsewhere) and run the command again"
        if full
        else "check the folder exists and is writable, or choose another location"
    )
    return cls(msg, hint=hint)


def make_dir(path: Path, what: str = "folder") -> Path:
    """``mkdir -p`` (mode from the umask); a failure is a StorageError naming the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(
            f"cannot create the {what} {path}: a file of that name exists", hint="choose another path"
        ) from None
    except OSError as e:
        raise storage_error(e, path, what=what) from None
    if not path.is_dir():
        raise StorageError(f"cannot create the {what} {path}: a file of that name exists", hint="choose another path")
    return path


def temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh temp folder in ``parent`` whose mode follows the umask (``mkdtemp`` alone gives 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, folder_mode())
    return tmp


def fsync_path(path: Path, *, strict: bool = False) -> None:
    """fsync a file or folder. Not ``strict``: a file system that cannot open or sync a folder is let be (the
    rename is atomic all the same); ``strict``: a failure is raised (a checkpoint's files must be on disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


_CHUNK = 64 << 20  # write in 64 MiB pieces: a short write or ENOSPC surfaces at a clear point


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:_CHUNK]) :]


def atomic_write(
    path: Path, data: bytes, *, what: str = "file", on_error: Callable[[OSError], BaseException] | None = None
) -> None:
    """Write ``data`` to ``path`` through ``.<name>.tmp-<pid>`` beside it (fsynced), one ``os.replace``, then
    an fsync of the folder. A failure removes the temp file and leaves what stood under the name untouched;
    an OSError becomes ``on_error(e)`` (default: a StorageError naming ``what`` and the path)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides the mode
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise (on_error(e) if on_error is not None else storage_error(e, path, what=what)) from None
    except BaseException:  # a signal (KeyboardInterrupt): the temp file goes too
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str, *, what: str = "file") -> None:
    """Write ``text`` (UTF-8) atomically: :func:`atomic_write`."""
    atomic_write(path, text.encode("utf-8"), what=what)


def remove_tree(path: Path) -> None:
    """Remove a folder utune created (best effort)."""
    shutil.rmtree(path, ignore_errors=True)

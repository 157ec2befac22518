"""Files utune writes: atomic replacement, folders that follow the umask, and one error for a failed write.

A failed write (full disk, no permission, a file where a folder should be) becomes a
:class:`~utune.errors.StorageError` naming the path and the fix, raised only after the partial file is
removed; what stood under the name before is untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
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


def fsync_path(path: Path) -> None:
    """fsync a file or folder (folders: where the file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, *, what: str = "file") -> None:
    """Write ``text`` to ``path`` through a temp file and one rename; StorageError (temp removed) on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(e, path, what=what) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_tree(path: Path) -> None:
    """Remove a folder utune created (best effort)."""
    shutil.rmtree(path, ignore_errors=True)

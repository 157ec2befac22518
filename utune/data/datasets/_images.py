"""Image files as users have them: read one (a clear error naming the file), check many before training.

A damaged file (truncated JPEG, zero-byte PNG, a "decompression bomb" over PIL's pixel limit, a text file
named ``.jpg``) must not end a run as an "internal error" from a DataLoader worker. :func:`check_images`
finds them first, cheaply: PIL reads the header (which is where the pixel limit is checked); a JPEG is
then decoded at 1/8 scale (``Image.draft``, a few hundred microseconds), which reaches its last byte, a
PNG's chunks are read with their CRCs (``Image.verify``), and other formats are decoded. Results are cached
per file by size and mtime under the data base, so a second run over the same folder pays nothing. A file
that still fails later in a worker raises :class:`UnreadableImageError`, which survives the worker's
re-raise as one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from utune.errors import DataError

# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHOWN = 5  # names printed in an error or warning; the rest are counted
PROGRESS_FROM = 2000  # files: fewer are checked without a progress line
_CACHE_VERSION = 1

Progress = Callable[[int, int], None]


class UnreadableImageError(DataError):
    """An image file PIL cannot read. Raised in a DataLoader worker, torch re-raises it in the main process
    as ``UnreadableImageError(<worker traceback text>)``: the original one-line message is recovered."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        if "Original Traceback" in message:  # torch's ExceptionWrapper.reraise: keep the original message
            marker = f"{type(self).__name__}: "
            found = [line.split(marker, 1)[1] for line in message.splitlines() if marker in line]
            message = found[-1] if found else message.strip().splitlines()[-1]
        super().__init__(message, hint or _HINT)


_HINT = "delete or replace the file, or set data.skip_bad_images=true to leave such files out"


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """The image as RGB, or :class:`UnreadableImageError` naming the file and PIL's reason."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, Image.DecompressionBombError):
        return "over PIL's pixel limit (a decompression bomb?): " + text
    return text


def problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an image (None when it can): the cheap check described above."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()
                elif image.format == "PNG":
                    image.verify()
                else:
                    image.load()
    except Image.DecompressionBombWarning as err:
        return "over PIL's pixel limit (a decompression bomb?): " + str(err).splitlines()[0]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as err:
        return _reason(err)
    return None


def _cache_path(base: Path, key: str) -> Path:
    return base / ".utune-checked" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _read_cache(path: Path) -> dict[str, list]:
    try:
        raw = json.loads(path.read_text())
        return raw["files"] if raw.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_cache(path: Path, files: dict[str, list]) -> None:
    """Best effort: a cache that cannot be written only costs the next run the check again."""
    try:
        from utune._fs import write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"version": _CACHE_VERSION, "files": files}), what="image check cache")
    except Exception:  # noqa: BLE001 - a cache is optional
        pass


def check_images(
    paths: Sequence[str], *, cache_dir: Path | None, key: str, progress: Progress | None = None
) -> dict[str, str]:
    """``{path: reason}`` for every file of ``paths`` that cannot be read (empty when all can).

    Files whose size and mtime match the cache (``cache_dir``, entry ``key``) are not opened again."""
    cache_file = _cache_path(cache_dir, key) if cache_dir is not None else None
    cached = _read_cache(cache_file) if cache_file is not None else {}
    stamps: dict[str, list] = {}
    todo: list[str] = []
    bad: dict[str, str] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as err:
            bad[path] = f"cannot open: {err.strerror or err}"
            continue
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cached.get(path)
        if hit is not None and hit[:2] == stamp:
            stamps[path] = hit
            if hit[2] is not None:
                bad[path] = hit[2]
        else:
            stamps[path] = stamp
            todo.append(path)
    if todo:
        found = _check_all(todo, progress)
        for path in todo:
            reason = found.get(path)
            stamps[path] = [*stamps[path], reason]
            if reason is not None:
                bad[path] = reason
        if cache_file is not None:
            _write_cache(cache_file, stamps)
    return bad


def _check_all(paths: list[str], progress: Progress | None) -> dict[str, str]:
    """Decoding releases the GIL: a few threads check several files at once."""
    threads = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    bad: dict[str, str] = {}
    last = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for done, (path, reason) in enumerate(zip(paths, pool.map(problem, paths), strict=True), 1):
            if reason is not None:
                bad[path] = reason
            if progress is not None and (time.monotonic() - last > 2 or done == len(paths)):
                progress(done, len(paths))
                last = time.monotonic()
    return bad


def describe(bad: dict[str, str]) -> str:
    """The first few bad files with their reasons, and how many more."""
    items = sorted(bad.items())
    text = "; ".join(f"{p} ({r})" for p, r in items[:SHOWN])
    return text + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def refuse(bad: dict[str, str], where: str) -> DataError:
    """The error for unreadable files found before training or prediction."""
    n = len(bad)
    return UnreadableImageError(
        f"{n} unreadable image{'s' if n > 1 else ''} in {where}: {describe(bad)}",
        hint="delete or replace them, or set data.skip_bad_images=true (predict: --skip-bad-images) to leave them out",
    )


def skipped(bad: dict[str, str], where: str) -> str:
    """The one warning for files left out by ``data.skip_bad_images``."""
    n = len(bad)
    return f"skipped {n} unreadable image{'s' if n > 1 else ''} in {where} (data.skip_bad_images): {describe(bad)}"

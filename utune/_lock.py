"""One writer per run folder: ``RUN/.lock``, held with ``flock`` for as long as a process trains there.

Two trainers on one folder would interleave ``metrics.jsonl`` and overwrite each other's checkpoints, and
both exit 0. The kernel releases an ``flock`` when its holder exits in any way (``kill -9`` and the OOM
killer included), so a lock file left behind by a dead process is stale by construction: the next
process takes it over. The file holds the holder's pid and host, so that a refusal can name them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from utune._fs import storage_error
from utune.errors import CheckpointError

LOCK = ".lock"


def _holder(path: Path) -> dict[str, object]:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8", errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _acquire(folder: Path) -> int:
    path = folder / LOCK
    for _ in range(10):  # another process may remove the file between our open and our lock: open it again
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(e, path, what="lock file of the run folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = _holder(path)
            pid, host = who.get("pid", "?"), who.get("host", "?")
            since = who.get("started")
            when = f", since {time.strftime('%H:%M:%S', time.localtime(since))}" if isinstance(since, float) else ""
            raise CheckpointError(
                f"{folder} is being trained by another process (pid {pid} on {host}{when})",
                hint=f"wait for it to finish, or stop it (kill {pid}) and resume with --resume; two trainers "
                "in one folder would overwrite each other's metrics and checkpoints",
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file its holder removed on its way out
            os.close(fd)
            continue
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError as e:
            os.close(fd)
            raise storage_error(e, path, what="lock file of the run folder") from None
        return fd
    raise CheckpointError(f"cannot lock {folder}: other processes keep taking it", hint="try again")


@contextlib.contextmanager
def run_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; refuse (CheckpointError, naming the holder's pid) when a live
    process holds it. The file is removed on the way out; a dead holder's file is taken over."""
    if not enabled:
        yield
        return
    fd = _acquire(Path(folder))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            (Path(folder) / LOCK).unlink()  # while still holding it: nobody locks a file we then remove
        os.close(fd)

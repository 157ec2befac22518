"""SIGINT and SIGTERM: stop cleanly, leave nothing half-written.

The CLI installs one of two behaviours around a command:

- ``graceful`` (training): the first signal only *asks* to stop; the training loop sees it at the next
  step boundary, writes a checkpoint there and raises :class:`utune.errors.Interrupted`, so ``--resume``
  continues exactly. A second signal stops at once (KeyboardInterrupt; the last checkpoint is intact).
- ``immediate`` (everything else): SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so the ``finally``
  and ``except BaseException`` blocks that remove temp files run; the default SIGTERM action would kill
  the process with its temp files on disk.

Library code only reads :func:`stop_requested`; it never installs handlers itself.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_requested: int | None = None  # the signal number that asked to stop, if any
_last: int | None = None  # the last signal received (for the exit code of an immediate stop)


def stop_requested() -> int | None:
    """The signal number that asked training to stop at the next step boundary, or None."""
    return _requested


def last_signal() -> int | None:
    return _last


def _immediate(signum: int, frame: FrameType | None) -> None:
    global _last
    _last = signum
    raise KeyboardInterrupt


def _graceful(signum: int, frame: FrameType | None) -> None:
    global _requested, _last
    _last = signum
    if _requested is not None:  # the second signal: stop now
        raise KeyboardInterrupt
    _requested = signum
    from utune import _output as out

    name = signal.Signals(signum).name
    out.note(
        f"[yellow]{name}: stopping after this step and saving a checkpoint (again to stop at once)[/]", markup=True
    )


@contextmanager
def handling(graceful: bool) -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only; a no-op elsewhere)."""
    global _requested, _last
    _requested = _last = None
    handler = _graceful if graceful else _immediate
    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (it reaches the whole process group): the main process decides.

    SIGTERM keeps its default so that the loader can still terminate its workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

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

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_requested: int | None = None  # the signal number that asked to stop, if any
_last: int | None = None  # the last signal received (for the exit code of an immediate stop)
_timer: threading.Timer | None = None  # ends the process if no step boundary comes within the grace period


def grace_seconds() -> float:
    """How long a graceful stop may wait for the next step boundary (``UTUNE_STOP_GRACE``, default 120 s):
    a process blocked in a collective whose peer died would otherwise wait for its timeout."""
    try:
        return float(os.environ.get("UTUNE_STOP_GRACE", "120"))
    except ValueError:
        return 120.0


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
    global _requested, _last, _timer
    _last = signum
    if _requested is not None:  # the second signal: stop now
        raise KeyboardInterrupt
    _requested = signum
    from utune import _output as out

    _timer = threading.Timer(grace_seconds(), _give_up, args=(signum,))
    _timer.daemon = True
    _timer.start()
    name = signal.Signals(signum).name
    out.note(
        f"[yellow]{name}: stopping after this step and saving a checkpoint (again to stop at once)[/]", markup=True
    )


def _give_up(signum: int) -> None:
    """No step boundary within the grace period (blocked in a collective, a very long step): leave now."""
    from utune import _output as out

    out.error(
        f"{signal.Signals(signum).name}: no step boundary within {grace_seconds():.0f} s; stopping without a new "
        "checkpoint (the last one is intact)",
        "resume with --resume; UTUNE_STOP_GRACE sets the wait",
    )
    os._exit(128 + signum)


def stop_acknowledged() -> None:
    """The training loop has seen the stop request and is saving: no deadline any more."""
    global _timer
    if _timer is not None:
        _timer.cancel()
        _timer = None


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
        stop_acknowledged()
        for s, h in old.items():
            signal.signal(s, h)


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (it reaches the whole process group): the main process decides.

    SIGTERM keeps its default so that the loader can still terminate its workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

"""The ``utune`` command: a thin Typer layer over the Python API (:mod:`utune.api`, :mod:`utune.runs`,
:mod:`utune.export`).

Every expected failure is a :class:`utune.errors.UtuneError`; :func:`main` prints it as one line plus a
hint and exits 2 (bad input) or 1 (internal); ``UTUNE_DEBUG=1`` shows tracebacks. Command-line mistakes
(an unknown option, a missing argument) exit 2 with the usage. SIGINT/SIGTERM end a command cleanly: no
temp file stays behind, training saves a checkpoint at the next step (see :mod:`utune._signals`), and
the exit code is 128 + the signal. Importing this module does not import torch, so ``--help`` is fast.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Annotated

import typer

from utune import __version__, _signals
from utune import _output as out
from utune.cli import apply as _apply
from utune.cli import compare as _compare
from utune.cli import export as _export
from utune.cli import inspect as _inspect
from utune.cli import multitask as _multitask
from utune.errors import Interrupted, UtuneError, UtuneWarning

app = typer.Typer(
    help="Config-driven model surgery for parameter-efficient transfer learning (U-Tuning).",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
spec_app = typer.Typer(help="Check spec files, print their schema, show the spec a tuner file carries.")
spec_app.info.no_args_is_help = True
app.add_typer(spec_app, name="spec")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"utune {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Config-driven model surgery for parameter-efficient transfer learning (U-Tuning)."""


_inspect.register(app, spec_app)
_apply.register(app)
_export.register(app)
_compare.register(app)
_multitask.register(app)


def _is_training(argv: list[str]) -> bool:
    return bool(argv) and ((argv[0] == "apply" and "--train" in argv) or argv[0] == "compare")


def _interrupted(code: int) -> int:
    name = signal.Signals(code - 128).name if 128 < code < 160 else "interrupt"
    out.error(f"interrupted ({name}); nothing was left half-written")
    return code


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning UtuneErrors into one-line messages and exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("UTUNE_DEBUG") == "1"
    warnings.showwarning = _show_warning
    with _signals.handling(graceful=_is_training(args)):
        try:
            code = _run(args, debug)
        except KeyboardInterrupt:  # a second SIGINT/SIGTERM while the first was being handled: stop now
            if debug:
                raise
            code = _stopped_now(128 + (_signals.last_signal() or signal.SIGINT))
    sys.exit(code)


def _stopped_now(code: int) -> int:
    name = signal.Signals(code - 128).name if 128 < code < 160 else "interrupt"
    out.error(
        f"stopped at once ({name} twice); the last checkpoint written is intact",
        "resume with the same command and --resume",
    )
    return code


_show_python_warning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """utune's own warnings as one ``warning:`` line; other libraries' as Python shows them."""
    if issubclass(category, UtuneWarning):
        out.warn(str(message))
    else:
        _show_python_warning(message, category, *args, **kwargs)  # type: ignore[arg-type]


def _run(args: list[str], debug: bool) -> int:
    out.set_json(False)  # each command starts as a table command; --format json switches it on
    try:
        code = app(args=args, prog_name="utune", standalone_mode=False)
    except typer.Abort:
        return _interrupted(128 + (_signals.last_signal() or signal.SIGINT))
    except Interrupted as e:
        if debug:
            raise
        out.error(e.message, e.hint)
        return e.exit_code
    except UtuneError as e:
        if debug:
            raise
        out.error(e.message, e.hint)
        return e.exit_code
    except typer.Exit as e:  # raised by Typer outside a command (e.g. --version)
        return e.exit_code
    except Exception as e:
        return _click_or_bug(e, debug)
    if isinstance(code, int) and code != 0:
        if code == 130 and _signals.last_signal() is not None:  # Typer turned a KeyboardInterrupt into 130
            return _interrupted(128 + _signals.last_signal())  # type: ignore[operator]
        return code
    return 0


def _click_or_bug(e: Exception, debug: bool) -> int:
    if isinstance(e, typer.TyperException) and hasattr(e, "show"):  # a command-line mistake: usage, exit 2
        e.show()
        return int(getattr(e, "exit_code", 2))
    if debug:
        raise e
    out.error(f"internal error: {type(e).__name__}: {e}", "rerun with UTUNE_DEBUG=1 and report the traceback")
    return 1

"""The ``utune`` command: a thin Typer layer over the Python API (:mod:`utune.engine.build`, :mod:`utune.runs`,
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
from utune.cli import predict as _predict
from utune.cli import specs as _specs
from utune.errors import UtuneError, UtuneWarning

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
    trust: Annotated[
        list[str] | None,
        typer.Option(
            "--trust",
            metavar="PKG",
            help="import code a run folder or tuner file names (model.name: PKG.module:function) as if you had "
            "named it: a package, module or package.module:attr (repeatable, or comma-separated)",
        ),
    ] = None,
) -> None:
    """Config-driven model surgery for parameter-efficient transfer learning (U-Tuning)."""
    if trust:
        from utune._imports import trust as _trust

        _trust(t.strip() for item in trust for t in item.split(",") if t.strip())


_inspect.register(app, spec_app)
_apply.register(app)
_export.register(app)
_compare.register(app)
_multitask.register(app)
_specs.register(app)
_predict.register(app)


def _is_training(argv: list[str]) -> bool:
    return bool(argv) and ((argv[0] == "apply" and "--train" in argv) or argv[0] == "compare")


def _wants_json(args: list[str]) -> bool:
    """``--format json`` (or ``-f json``, ``--format=json``) anywhere on the line: errors come as JSON too."""
    pairs = zip(args, [*args[1:], ""], strict=True)
    return any(
        (a in ("--format", "-f") and b == "json") or a in ("--format=json", "-fjson", "-f=json") for a, b in pairs
    )


def _failed(message: str, hint: str | None, code: int, as_json: bool) -> int:
    """The one rendering point of a failure: the message (and hint) on stderr; with ``--format json`` also
    one JSON document on stdout (``error``, ``hint``, ``exit_code``), so a script always parses stdout."""
    out.error(message, hint)
    if as_json or out.json_mode():
        out.print_json({"error": message, "hint": hint, "exit_code": code})
    return code


def _interrupted(code: int, as_json: bool = False) -> int:
    name = signal.Signals(code - 128).name if 128 < code < 160 else "interrupt"
    return _failed(f"interrupted ({name}); nothing was left half-written", None, code, as_json)


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
    _exit_on_signal()  # the command is done: a signal now (a second Ctrl-C) only makes the exit immediate
    sys.exit(code)


def _exit_on_signal() -> None:
    def now(signum: int, frame: object) -> None:
        sys.stdout.flush()
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, now)


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
    as_json = _wants_json(args)
    try:
        code = app(args=args, prog_name="utune", standalone_mode=False)
    except typer.Abort:
        return _interrupted(128 + (_signals.last_signal() or signal.SIGINT), as_json)
    except UtuneError as e:  # Interrupted included
        if debug:
            raise
        return _failed(e.message, e.hint, e.exit_code, as_json)
    except typer.Exit as e:  # raised by Typer outside a command (e.g. --version)
        return e.exit_code
    except Exception as e:
        return _click_or_bug(e, debug, as_json)
    if isinstance(code, int) and code != 0:
        if code == 130 and _signals.last_signal() is not None:  # Typer turned a KeyboardInterrupt into 130
            return _interrupted(128 + _signals.last_signal(), as_json)  # type: ignore[operator]
        return code
    return 0


def _click_or_bug(e: Exception, debug: bool, as_json: bool) -> int:
    if isinstance(e, typer.TyperException) and hasattr(e, "show"):  # a command-line mistake: usage, exit 2
        e.show()
        code = int(getattr(e, "exit_code", 2))
        if as_json:
            out.print_json({"error": e.format_message(), "hint": "see --help", "exit_code": code})
        return code
    if debug:
        raise e
    hint = "rerun with UTUNE_DEBUG=1 and report the traceback"
    return _failed(f"internal error: {type(e).__name__}: {e}", hint, 1, as_json)

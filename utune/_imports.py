"""The user's own code named in a spec: ``package.module:attr`` references and entry points.

A spec may name a model factory (``model.name: my_pkg.nets:make_net``) or a tuner kind
(``kind: my_pkg.kinds:GatedAdapter``). Importing such a name runs the user's code, so this module is the
security boundary: a reference is imported only when the *user* named it, i.e. it appeared in a spec the
user passed (a file on the command line, a path or dict given to the Python API), in ``--trust`` /
``UTUNE_TRUST`` (module names or references, comma-separated), or an installed package publishes it through
an entry point (installing a package is the user's act). A name read only from a data file (a tuner file's
embedded spec, a PEFT folder, a run's ``spec.yaml``) is refused with :class:`UntrustedCodeError` before
anything is imported.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utune.errors import UserInputError

# ``package.module:attr`` (attr may be dotted: ``pkg.mod:Class.factory``); no paths, no spaces
REF_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
_REF = re.compile(REF_PATTERN)
TRUST_ENV = "UTUNE_TRUST"
_trusted: set[str] = set()


class UntrustedCodeError(UserInputError):
    """A data file names code to import that the user did not name."""


class CodeImportError(UserInputError):
    """A reference the user named cannot be imported (missing module or attribute, or the import failed)."""


def is_ref(name: object) -> bool:
    """Whether ``name`` is a ``package.module:attr`` reference (rather than a registry name)."""
    return isinstance(name, str) and _REF.match(name) is not None


def trust(refs: Iterable[str]) -> None:
    """Record references (or module names) the user named: they may be imported for the rest of the process."""
    _trusted.update(r for r in refs if r)


def trusted_names() -> set[str]:
    """What may be imported now: the recorded names and ``UTUNE_TRUST``'s."""
    env = {t.strip() for t in os.environ.get(TRUST_ENV, "").split(",") if t.strip()}
    return _trusted | env


def is_trusted(ref: str) -> bool:
    """A reference is trusted when it, or its module, or a package above its module, was named by the user."""
    names = trusted_names()
    module = ref.split(":", 1)[0]
    parts = module.split(".")
    return ref in names or any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))


def check_trusted(ref: str, *, what: str, source: str | None = None) -> None:
    """Raise :class:`UntrustedCodeError` unless ``ref`` is trusted (see the module docstring)."""
    if is_trusted(ref):
        return
    where = f" in {source}" if source else ""
    raise UntrustedCodeError(
        f"{what} {ref!r}{where} names code to import, and utune imports only code you named",
        hint=f"if you trust it, name it yourself: pass a spec that names it, `utune --trust {ref.split(':')[0]} ...`, "
        f"or set {TRUST_ENV}={ref.split(':')[0]}",
    )


def load_ref(ref: str, *, what: str, source: str | None = None) -> Any:
    """Import ``package.module:attr`` (after :func:`check_trusted`); the current folder is on the path, as
    for ``python -m``. :class:`CodeImportError` names what could not be imported and why."""
    check_trusted(ref, what=what, source=source)
    module_name, attr = ref.split(":", 1)
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after everything installed: a local file never shadows a package
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        raise CodeImportError(
            f"{what} {ref!r}: cannot import {module_name!r} (no module named {missing!r})",
            hint="install the package, or run from the folder that holds it, or add that folder to PYTHONPATH",
        ) from None
    except Exception as e:  # the user's module raised while importing: say what, not where in utune
        raise CodeImportError(
            f"{what} {ref!r}: importing {module_name!r} failed: {type(e).__name__}: {e}",
            hint="fix the error in that module (UTUNE_DEBUG=1 shows its traceback)",
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:8]
            raise CodeImportError(
                f"{what} {ref!r}: {module_name!r} has no attribute {attr!r}",
                hint=f"names it defines: {', '.join(public)}" if public else "check the name after the colon",
            )
        obj = getattr(obj, part)
    return obj


def entry_points(group: str) -> dict[str, Any]:
    """The entry points installed packages publish in ``group`` (name -> EntryPoint, not yet loaded)."""
    from importlib.metadata import entry_points as _eps

    return {ep.name: ep for ep in _eps(group=group)}

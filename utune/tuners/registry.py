"""The tuner registry: defining a tuner kind registers it; nothing else names it.

Three sources of kinds, one lookup (:func:`get_kind`), by the name a spec's ``kind:`` uses:

- built-in: every file under ``utune/tuners/`` registers its kinds (``@register``);
- published: an installed package lists ``name = "pkg.module:Class"`` in the entry-point group ``utune.kinds``
  (installing it is the user's act, so it is trusted; a name of a built-in kind cannot be taken);
- by import path: ``kind: my_pkg.kinds:GatedAdapter``, imported through :mod:`utune._imports` only when the
  user named it (a spec they passed, ``--trust``, ``UTUNE_TRUST``), never when only a data file does.

A kind from the user's code subclasses :class:`utune.kinds.TunerKind` (docs/adding-a-kind.md); its ``kind``
attribute may be left out: the name the spec uses is then its name in reports.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from utune.errors import SpecError

if TYPE_CHECKING:
    from utune.tuners.base import TunerKind

ENTRY_POINT_GROUP = "utune.kinds"
_KINDS: dict[str, type[TunerKind]] = {}
_EXTERNAL: dict[str, type[TunerKind]] = {}  # kinds from the user's code loaded so far, by spec name
_PLUGINS: dict[str, Any] | None = None  # entry-point name -> EntryPoint, read once per process
_BROKEN: dict[str, Exception] = {}  # entry points that failed to load, and why


def register(cls: type[TunerKind]) -> type[TunerKind]:
    """Class decorator: add a tuner kind to the registry (duplicates are a programming error)."""
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise RuntimeError(f"tuner kind {cls.kind!r} registered twice ({_KINDS[cls.kind]} and {cls})")
    _KINDS[cls.kind] = cls
    return cls


_SUPPORT = {"base", "registry", "fold", "modules"}  # the machinery in utune/tuners/, not kinds
_BUILTINS_LOADED = False


def load_builtins() -> None:
    """Import every kind file of ``utune/tuners/`` once (each registers itself where it is defined): adding a
    kind is adding its file. Found by listing this folder, so the registry imports no package above it."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    import importlib
    import pkgutil
    from pathlib import Path

    _BUILTINS_LOADED = True  # set first: a kind file importing the registry does not recurse here
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _SUPPORT and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def builtin_kinds() -> dict[str, type[TunerKind]]:
    """The kinds utune ships (the files under ``utune/tuners/``)."""
    load_builtins()
    return dict(sorted(_KINDS.items()))


def _entry_points() -> dict[str, Any]:
    global _PLUGINS
    if _PLUGINS is None:
        from utune._imports import entry_points

        _PLUGINS = entry_points(ENTRY_POINT_GROUP)
    return _PLUGINS


def kinds() -> dict[str, type[TunerKind]]:
    """Every kind a spec may name by a short name: the built-in ones, then those installed packages publish
    (entry points that fail to load are left out; :func:`plugin_problems` says why)."""
    found = builtin_kinds()
    for name, ep in sorted(_entry_points().items()):
        if name in found and name not in _BROKEN:  # the built-in kind wins; say so rather than shadow it
            _BROKEN[name] = _not_a_kind(name, f"{ep.value} takes the name of a built-in kind, which wins")
        if name not in found and name not in _BROKEN:
            try:
                found[name] = get_kind(name)
            except Exception as e:  # a broken plugin must not take the built-in kinds down with it
                _BROKEN[name] = e
    return found


def plugin_problems() -> dict[str, str]:
    """Entry points of the ``utune.kinds`` group that could not be loaded, with the reason."""
    kinds()
    return {name: str(e).splitlines()[0] for name, e in sorted(_BROKEN.items())}


def kind_source(name: str) -> str:
    """Where a kind comes from, in words: ``utune``, ``entry point (dist)`` or ``import path``."""
    if name in builtin_kinds():
        return "utune"
    ep = _entry_points().get(name)
    if ep is not None:
        dist = getattr(getattr(ep, "dist", None), "name", None)
        return f"entry point ({dist})" if dist else "entry point"
    return "import path"


def get_kind(name: str, *, source: str | None = None) -> type[TunerKind]:
    """The kind a spec names: a built-in or published name, or ``package.module:Class`` (imported only when the
    user named it: :class:`utune._imports.UntrustedCodeError` otherwise; :class:`utune._imports.CodeImportError`
    when it cannot be imported or is not a kind). ``source`` names the file, for messages."""
    builtin = builtin_kinds()
    if name in builtin:
        return builtin[name]
    if name in _EXTERNAL:
        return _EXTERNAL[name]
    from utune._imports import is_ref, load_ref, trust

    plugins = _entry_points()
    if is_ref(name):
        obj = load_ref(name, what="tuner kind", source=source)
    elif name in plugins:
        if name in _BROKEN:
            raise _BROKEN[name]
        ep = plugins[name]
        if not is_ref(ep.value):
            raise _not_a_kind(name, f"its entry point names {ep.value!r}, not package.module:Class")
        trust([ep.value])  # installing the package that publishes it was the user's act
        obj = load_ref(ep.value, what=f"tuner kind {name!r} (entry point {ENTRY_POINT_GROUP})", source=source)
    else:
        known = [*builtin, *(p for p in plugins if p not in builtin)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known kinds: {', '.join(known)}"
        raise SpecError(
            f"unknown tuner kind {name!r}",
            hint=hint + " (`utune tuners` lists them; a kind from your code is named package.module:Class)",
        )
    _EXTERNAL[name] = _checked(name, obj)
    return _EXTERNAL[name]


def use_class(cls: type[TunerKind]) -> str:
    """Make a kind class given in code (not by name: a test's, a notebook's) usable in a spec; returns its
    name there, ``module:Qualname`` (the caller handed the class over: nothing is imported)."""
    name = f"{cls.__module__}:{cls.__qualname__}"
    if _EXTERNAL.get(name) is not cls:
        _EXTERNAL[name] = _checked(name, cls)
    return name


def _not_a_kind(name: str, why: str) -> Exception:
    from utune._imports import CodeImportError

    return CodeImportError(
        f"tuner kind {name!r}: {why}",
        hint="a kind subclasses utune.kinds.TunerKind and defines build() or plan() (docs/adding-a-kind.md)",
    )


def _checked(name: str, obj: Any) -> type[TunerKind]:
    """The user's class, checked to be a complete kind; its ``kind`` defaults to the name the spec uses."""
    from utune.tuners.base import TunerKind, TunerOptions

    if not isinstance(obj, type) or not issubclass(obj, TunerKind):
        what = f"the class {obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise _not_a_kind(name, f"it is {what}, not a subclass of utune.kinds.TunerKind")
    if obj.plan is TunerKind.plan and obj.build is TunerKind.build:
        raise _not_a_kind(name, f"{obj.__qualname__} defines neither build() nor plan()")
    if not (isinstance(obj.Options, type) and issubclass(obj.Options, TunerOptions)):
        raise _not_a_kind(name, f"{obj.__qualname__}.Options is not a subclass of utune.kinds.TunerOptions")
    if not isinstance(getattr(obj, "kind", None), str):
        obj.kind = name
    return obj


def _option_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """The JSON-schema facts of one option a user needs (type, allowed values, bounds), titles dropped."""
    keep = ("type", "enum", "anyOf", "items", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "const")
    out: dict[str, Any] = {}
    for key in keep:
        if key in prop:
            value = prop[key]
            out[key] = [_option_schema(v) for v in value] if key == "anyOf" else value
    return out


def _identity(cls: type[TunerKind]) -> dict[str, bool | None]:
    """Whether the tuned model equals the base at init, per placement (prefix/prompt: parallel only); None:
    not promised either way (``kind: module``: the user's module decides)."""
    out: dict[str, bool | None] = {}
    for placement in cls.placements:
        probe = cls.__new__(cls)  # identity_at_init may be a property of the placement; no rule needed
        probe.placement = placement
        claim = probe.identity_at_init
        out[placement] = None if claim is None else bool(claim)
    return out


def describe_kinds(names: Iterable[str] | None = None, *, builtin_only: bool = False) -> list[dict[str, Any]]:
    """Kinds as plain data: placements, flags, where each comes from, and each option's default, schema and
    meaning. ``names``: these kinds (import paths included) instead of every short-named one."""
    if names is not None:
        chosen = {n: get_kind(n) for n in names}
    else:
        chosen = builtin_kinds() if builtin_only else kinds()
    rows = []
    for name, cls in chosen.items():
        schema = cls.Options.model_json_schema()
        props = schema.get("properties", {})
        options = {}
        for key, field in cls.Options.model_fields.items():
            shown = field.alias or key  # `class:` of kind: module
            options[shown] = {
                "default": None if field.is_required() else field.get_default(call_default_factory=True),
                "required": field.is_required(),
                "description": field.description or "",
                "schema": _option_schema(props.get(shown, {})),
                "runtime_only": key in getattr(cls.Options, "runtime_only", ()),
            }
        rows.append(
            {
                "kind": name,
                "source": kind_source(name),
                "summary": cls.summary,
                "placements": list(cls.placements),
                "default_placement": cls.default_placement,
                "identity_at_init": _identity(cls),
                "mergeable": cls.mergeable,
                "options": options,
            }
        )
    return rows


def kinds_markdown(rows: list[dict[str, Any]] | None = None) -> str:
    """The README's kinds table, generated from the registry (a test keeps the README equal to it)."""
    rows = describe_kinds(builtin_only=True) if rows is None else rows
    head = "| kind | placements | what it is | options (defaults) | identity at init | merges |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"`{k}={_md_value(o['default'], o.get('required', False))}`" for k, o in r["options"].items())
        opts = opts or "-"
        ident = r["identity_at_init"]
        if any(v is None for v in ident.values()):
            shown = "the module's choice"
        elif all(ident.values()) or not any(ident.values()):
            shown = "yes" if all(ident.values()) else "no"
        else:
            shown = "; ".join(f"{p}: {'yes' if v else 'no'}" for p, v in ident.items())
        merges = "yes" if r["mergeable"] else "no"
        lines.append(f"| `{r['kind']}` | {', '.join(r['placements'])} | {r['summary']} | {opts} | {shown} | {merges} |")
    return "\n".join(lines) + "\n"


def _md_value(value: Any, required: bool = False) -> str:
    return "(required)" if required else "null" if value is None else str(value)


README_START, README_END = "<!-- tuners-table:start -->\n", "<!-- tuners-table:end -->"


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the kinds table between the README's markers from the registry (``make docs``); True if changed."""
    from pathlib import Path

    file = Path(path)
    text = file.read_text()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_START + kinds_markdown() + README_END + tail
    if new != text:
        file.write_text(new)
    return new != text

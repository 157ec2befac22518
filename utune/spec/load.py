"""Loading a spec (its schema is :mod:`utune.spec.schema`): YAML with lines, overrides, validation, hashing.

Loading is strict and talkative: every problem in a file is reported at once, each with its line,
key path and (for typos) a did-you-mean, because specs are typed by hand and a run that dies on
its third typo wastes an afternoon. A tuner kind's own options are written flat in its rule and
checked by that kind's ``Options`` model in a second phase, so both phases' errors arrive together.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, get_args

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from utune._imports import REF_PATTERN, is_ref
from utune._schema import Section
from utune.errors import OverrideError, SpecError, UserInputError
from utune.graph.trainable import TypeSelector
from utune.spec.schema import (
    _COMMON,
    _HINT,
    _LAYERS_SCHEMA,
    _OVERRIDE_HINT,
    _STR_OR_LIST,
    _TRAINABLE_ITEM,
    SPEC_VERSION,
    Spec,
    _duplicate_names,
    _options_class,
    _Problem,
)
from utune.spec.yamlpos import (
    Loc,
    Override,
    YamlSyntaxError,
    apply_override,
    duplicate_keys,
    line_of,
    parse_yaml,
    written_loc,
)
from utune.tuners.registry import get_kind, kinds

# --- loading -------------------------------------------------------------------------------------


def load_spec(
    source: str | Path | dict[str, Any] | Spec, overrides: Sequence[str] = (), *, trusted: bool | None = None
) -> Spec:
    """Load and validate a spec from a file path, a dict, or a loaded Spec (overrides applied again).

    ``trusted``: the user gave this spec, so the code it names (``package.module:attr``) may be imported
    (:mod:`utune._imports`); pass False for a spec read from a data file (a tuner file's embedded spec, a
    PEFT folder, a run's ``spec.yaml``). Default: True, or a loaded Spec's own."""
    if isinstance(source, Spec):
        keep = source.trusted if trusted is None else trusted and source.trusted
        spec = _build(spec_to_dict(source), None, source.source, overrides, prior=source.overrides, trusted=keep)
        spec._source_path, spec._source_text = source.source_path, source.source_text
        return spec
    if isinstance(source, dict):
        data = copy.deepcopy(source)
        _resolve_paths(data, Path.cwd())
        return _build(data, None, "<dict>", overrides, trusted=trusted is not False)
    path = Path(source)
    if path.is_dir():
        raise SpecError(f"{path} is a folder, not a spec file", hint="pass the spec's .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        builtin = _builtin(path)  # a built-in spec's name (utune.spec.catalog) where no such file exists
        if builtin is not None:
            return load_spec(builtin, overrides, trusted=trusted)
        raise SpecError(
            f"spec file not found: {path}",
            hint="check the path (relative to the current folder); `utune specs` lists the built-in specs",
        ) from None
    except UnicodeDecodeError:
        raise SpecError(f"spec {path} is not a text file (not UTF-8)", hint="pass the spec's .yaml file") from None
    except OSError as exc:
        raise SpecError(
            f"cannot read spec {path}: {exc.strerror or exc}", hint="check the file's permissions"
        ) from None
    return load_spec_text(text, str(path), overrides, path=path, trusted=trusted is not False)


def _builtin(path: Path) -> Path | None:
    from utune.spec.catalog import find, is_builtin_name

    return find(str(path)).path if is_builtin_name(str(path)) else None


def load_spec_text(
    text: str,
    source: str = "<text>",
    overrides: Sequence[str] = (),
    *,
    path: Path | None = None,
    trusted: bool = True,
) -> Spec:
    """Load a spec from YAML text (e.g. the copy embedded in a tuner export: pass ``trusted=False``);
    ``source`` names it."""
    try:
        data, root = parse_yaml(text)
    except YamlSyntaxError as exc:
        p = exc.problem
        where = f"{source}:{p.line}" + (f":{p.column}" if p.column else "")
        problems = [f"{where}: YAML syntax error: {p.message}"]
        raise SpecError(f"spec {source} is not valid YAML", problems, "check indentation, colons and quoting") from None
    if data is None:
        problem = f"{source}:1: (top level): the spec is empty; it must be a mapping starting with `version: 1`"
        raise SpecError(f"spec {source} is empty", [problem], hint=_HINT)
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else f"a {type(data).__name__} ({data!r:.40})"
        want = "expected a mapping of sections (version, model, tuners, ...)"
        problem = f"{source}:{line_of(root, ())}: (top level): {want}, got {got}"
        raise SpecError(f"spec {source} is invalid (1 problem)", [problem], hint=_HINT)
    early = [_Problem(loc, msg, line=line) for loc, line, msg in duplicate_keys(root)]
    if path is not None:
        _resolve_paths(data, path.resolve().parent)  # paths in a file are relative to the file
    spec = _build(data, root, source, overrides, early=early, trusted=trusted)
    spec._source_path, spec._source_text = path, text
    return spec


def validate_files(paths: Iterable[str | Path]) -> list[tuple[Path, SpecError | None]]:
    """Check each file; the error (or ``None``) per file, for ``utune spec validate FILE...``."""
    results: list[tuple[Path, SpecError | None]] = []
    for path in paths:
        try:
            load_spec(Path(path))
        except SpecError as exc:
            results.append((Path(path), exc))
        else:
            results.append((Path(path), None))
    return results


# Keys holding file or folder paths: relative ones are resolved against the spec file's folder (written in
# the file) or the current folder (given as an override), so a run stores absolute paths and its spec.yaml
# works from any folder.
PATH_KEYS: tuple[tuple[str, str], ...] = (("model", "pretrained"), ("data", "root"))


def _resolve_paths(data: Any, base: Path, only: Iterable[tuple[str, str]] = PATH_KEYS) -> None:
    if not isinstance(data, dict):
        return
    for section, key in only:
        part = data.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if (
            isinstance(part, dict)
            and isinstance(value, str)
            and value.strip()
            and value.strip().lower()
            not in (
                "true",
                "false",
            )
        ):
            path = Path(value).expanduser()
            part[key] = str(path if path.is_absolute() else (base / path).resolve())


def _build(
    data: dict[str, Any],
    root: Any,
    source: str,
    overrides: Sequence[str],
    early: Sequence[_Problem] = (),
    prior: tuple[str, ...] = (),
    trusted: bool = True,
) -> Spec:
    applied = _apply_overrides(data, overrides)
    if trusted:  # the code this spec names may be imported (before validation: a kind's options need it)
        _trust_refs(data)
    given = [o.path[:2] for o in applied if tuple(o.path[:2]) in PATH_KEYS]
    _resolve_paths(data, Path.cwd(), only=[tuple(g) for g in given])  # type: ignore[misc]
    problems = list(early)
    version = _version_problem(data)
    if version is not None:  # the version decides how to read the rest: stop here
        _fail([*problems, version], source, root, data, applied)
    for key in ("tuners", "trainable", "data", "train", "export"):
        if key in data and data[key] is None:  # `train:` with every line commented out
            del data[key]
    spec, found = _validate(data)
    problems += found
    if problems or spec is None:
        _fail(problems, source, root, data, applied)
    spec._source, spec._overrides = source, prior + tuple(overrides)
    spec._trusted = trusted
    return spec


def _trust_refs(data: dict[str, Any]) -> None:
    """Record the ``package.module:attr`` names a user-given spec holds (``model.name``, each rule's ``kind``
    and string options such as ``kind: module``'s ``class``) as the user's: see :mod:`utune._imports`."""
    from utune._imports import trust

    model = data.get("model")
    found: list[Any] = [model.get("name")] if isinstance(model, dict) else []
    for rule in data.get("tuners") or []:
        if isinstance(rule, dict):
            found += list(rule.values())
    trust(r for r in found if is_ref(r))


def _version_problem(data: dict[str, Any]) -> _Problem | None:
    if "version" not in data:
        return _Problem(("version",), "missing; a spec starts with `version: 1`", missing=True)
    version = data["version"]
    if type(version) is not int or version != SPEC_VERSION:
        return _Problem(("version",), f"unsupported spec version {version!r}; this utune reads version 1")
    return None


def _validate(data: dict[str, Any]) -> tuple[Spec | None, list[_Problem]]:
    """Phase 2 (each rule's options) and phase 1 (everything else); returns all problems of both."""
    problems: list[_Problem] = []
    phase1 = dict(data)
    if isinstance(data.get("tuners"), list):
        rules: list[Any] = []
        for i, raw in enumerate(data["tuners"]):
            if not isinstance(raw, dict):
                rules.append(raw)
                continue
            common = {k: v for k, v in raw.items() if k in _COMMON}
            options, found = _validate_options(i, raw)
            problems += found
            if options is not None:
                common["options"] = options
            rules.append(common)
        phase1["tuners"] = rules
        problems += _duplicate_names([r.get("name") if isinstance(r, dict) else None for r in data["tuners"]])
    try:
        return Spec.model_validate(phase1, context={"names_checked": True}), problems
    except ValidationError as exc:
        return None, problems + [_from_pydantic(err, ()) for err in exc.errors()]


def _validate_options(index: int, raw: dict[str, Any]) -> tuple[Section | None, list[_Problem]]:
    kind = raw.get("kind")
    if not isinstance(kind, str) or _unknown_kind(kind):
        return None, []  # phase 1 reports the missing or unknown kind
    options_cls = _options_class(kind)
    raw, found = _layout(index, kind, raw, options_cls)
    if found:
        return None, found
    try:
        return options_cls.model_validate({k: v for k, v in raw.items() if k not in _COMMON}), []
    except ValidationError as exc:
        names = [*_COMMON, *(f.alias or n for n, f in options_cls.model_fields.items())]  # `class:` of kind module
        return None, [_from_pydantic(err, ("tuners", index), names) for err in exc.errors()]


def _unknown_kind(kind: str) -> bool:
    try:
        get_kind(kind)
    except UserInputError:
        return True
    return False


_LAYOUTS = {"channels_first": 1, "nchw": 1, "channels_last": -1, "nhwc": -1, "tokens": -1}


def _layout(index: int, kind: str, raw: dict[str, Any], options_cls: type) -> tuple[dict[str, Any], list[_Problem]]:
    """``layout: channels_first | channels_last`` (``nchw``/``nhwc``/``tokens``) on a rule: where the channels of
    the values it reads sit, for kinds that map channels (``channel_dim: 1`` or ``-1`` in the kind's words)."""
    if "layout" not in raw:
        return raw, []
    loc: Loc = ("tuners", index, "layout")
    value = raw["layout"]
    if "channel_dim" not in getattr(options_cls, "model_fields", {}):
        return raw, [_Problem(loc, f"kind {kind!r} reads no channel layout; remove `layout: {value}`")]
    if not isinstance(value, str) or value.lower() not in _LAYOUTS:
        return raw, [
            _Problem(loc, f"layout {value!r} is not one of: channels_first, channels_last (nchw, nhwc, tokens)")
        ]
    dim = _LAYOUTS[value.lower()]
    if raw.get("channel_dim") not in (None, dim):
        return raw, [_Problem(loc, f"layout: {value} says channel_dim {dim}, the rule says {raw['channel_dim']}")]
    return {**{k: v for k, v in raw.items() if k != "layout"}, "channel_dim": dim}, []


def _from_pydantic(err: Any, prefix: Loc, names: list[str] | None = None) -> _Problem:
    """Turn one pydantic error into a problem with a message a YAML author understands."""
    loc = prefix + tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = names if names is not None else _fields_at(loc[:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        more = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
        return _Problem(loc, f"unknown key {key!r} ({more})")
    if kind == "missing":
        return _Problem(loc, "required key is missing", missing=True)
    if kind in ("value_error", "assertion_error"):
        return _Problem(loc, str(err["ctx"]["error"]))
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return _Problem(loc, f"{msg} (got {json.dumps(err.get('input'), default=repr)[:60]})")


def _fields_at(loc: Loc) -> list[str]:
    """The keys allowed in the mapping at ``loc`` (for did-you-mean), walking Spec's annotations."""
    model: type[BaseModel] | None = Spec
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field is not None else None
    return [name for name in model.model_fields if name != "options"] if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _fail(problems: list[_Problem], source: str, root: Any, data: Any, applied: list[Override]) -> NoReturn:
    """Raise one SpecError listing every problem, sorted by line; problems of the same key are merged."""
    grouped: dict[str, tuple[tuple[int, int], list[str]]] = {}
    for p in problems:
        loc = p.loc if p.line is not None else written_loc(p.loc, data, p.missing)
        dotted = ".".join(map(str, loc)) or "(top level)"
        owner = next((o for o in reversed(applied) if loc[: len(o.owner)] == o.owner), None)
        if owner is not None:
            head, order = f"override {owner.text!r}" + ("" if loc == owner.path else f": {dotted}"), (1, 0)
        else:
            line = p.line or line_of(root, loc)
            head, order = (f"{source}:{line}" if root is not None else source) + f": {dotted}", (0, line)
        messages = grouped.setdefault(head, (order, []))[1]
        if p.message not in messages:
            messages.append(p.message)
    lines = [f"{head}: {'; '.join(msgs)}" for head, (_, msgs) in sorted(grouped.items(), key=lambda kv: kv[1][0])]
    cls = OverrideError if any(line.startswith("override ") for line in lines) else SpecError
    plural = "" if len(lines) == 1 else "s"
    raise cls(f"spec {source} is invalid ({len(lines)} problem{plural})", problems=lines, hint=_HINT)


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[Override]:
    applied, problems = [], []
    for text in overrides:
        try:
            applied.append(apply_override(data, text))
        except ValueError as exc:
            problems.append(f"override {text!r}: {exc}")
    if problems:
        raise OverrideError(f"bad override{'s' if len(problems) > 1 else ''}", problems, hint=_OVERRIDE_HINT)
    return applied


# --- dumping and schema --------------------------------------------------------------------------


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The resolved spec as plain JSON-able data, each rule's options written flat as in the YAML."""
    data = spec.model_dump(mode="json")
    for rule in data["tuners"]:
        rule.update(rule.pop("options") or {})
    return data


def with_model(spec: Spec, **values: Any) -> Spec:
    """``spec`` with ``model.<key>`` set to resolved values (``num_classes``, ``class_names`` read from the
    dataset), validated again; where it came from, its overrides and its trust are kept."""
    data = spec_to_dict(spec)
    data["model"].update(values)
    new = _build(data, None, spec.source, (), prior=spec.overrides, trusted=spec.trusted)
    new._source_path, new._source_text = spec.source_path, spec.source_text
    return new


def spec_to_yaml(spec: Spec, relative_to: Path | None = None) -> str:
    """A resolved, re-loadable YAML dump (every default filled in), e.g. for a run directory.

    ``relative_to``: a file that travels (a tuner file's embedded spec) names no absolute local path: the
    weights and data paths are written relative to that folder (where loading it back resolves them) and the
    header names the source spec by its file name only."""
    source = Path(spec.source).name if relative_to is not None else spec.source
    header = f"# resolved by utune from {source}"
    if spec.overrides:
        header += " with overrides: " + " ".join(spec.overrides)
    data = spec_to_dict(spec)
    if relative_to is not None:
        for section, key in PATH_KEYS:
            value = data.get(section, {}).get(key)
            if isinstance(value, str) and Path(value).is_absolute():
                data[section][key] = os.path.relpath(value, Path(relative_to).resolve())
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return header.replace("\n", " ") + "\n" + body


# Keys added after runs were first named by their spec's hash, which cannot change what a run trains: left
# out of the hash while they hold these defaults, so a newer utune reuses an older one's finished runs
# (``utune compare``, ``bench/transfer.py``) instead of training them again.
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("train", "release_freed_memory"): False,
    ("data", "test_size"): None,
    ("data", "skip_bad_images"): False,
    ("model", "class_names"): None,
    ("model", "input_size"): None,
}
# The same for options a kind gained later, (kind, option): the default, at which it builds what it built before.
HASH_NEUTRAL_OPTIONS: dict[tuple[str, str], Any] = {
    ("adapter", "dropout"): 0.0,
    ("prompt", "dropout"): 0.0,
    ("prompt", "init"): "normal",
}


def spec_hash(spec: Spec) -> str:
    """sha256 of the resolved spec's canonical JSON: equal settings give equal hashes."""
    data = spec_to_dict(spec)
    for (section, key), default in HASH_NEUTRAL_DEFAULTS.items():
        if data.get(section, {}).get(key, default) == default:
            data.get(section, {}).pop(key, None)
    for rule in data.get("tuners", []):
        for (kind, key), default in HASH_NEUTRAL_OPTIONS.items():
            if rule.get("kind") == kind and rule.get(key, default) == default:
                rule.pop(key, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def spec_json_schema() -> dict[str, Any]:
    """A JSON schema for editors: each registered kind's options are allowed in rules of that kind."""
    schema = Spec.model_json_schema()
    defs = schema.setdefault("$defs", {})
    defs["TypeSelector"] = TypeSelector.model_json_schema()
    trainable = schema["properties"]["trainable"]
    trainable["anyOf"] = [{"type": "string"}, {"type": "array", "items": _TRAINABLE_ITEM}]
    rule = defs["TunerRule"]
    selector = defs["Selector"]["properties"]
    for key in ("path", "type", "op", "exclude"):  # a lone string is accepted as a one-item list
        selector[key] = {**_STR_OR_LIST, "default": selector[key].get("default")}
    selector["layers"] = {**_LAYERS_SCHEMA, "default": None}
    selector_ref = {"$ref": "#/$defs/Selector"}
    rule["properties"]["at"] = {"anyOf": [*_STR_OR_LIST["anyOf"], selector_ref], "description": "where to attach"}
    variants = []
    for name, cls in kinds().items():
        options = getattr(cls, "Options", Section).model_json_schema(ref_template="#/$defs/{model}")
        defs.update(options.pop("$defs", {}))
        properties = {**rule["properties"], **options.get("properties", {}), "kind": {"const": name}}
        taps = sorted({t for allowed in getattr(cls, "taps", {"": ("input", "output")}).values() for t in allowed})
        if taps:
            properties["tap"] = {"anyOf": [{"enum": taps}, {"type": "null"}], "default": None}
        else:
            properties.pop("tap", None)
        if "channel_dim" in properties:  # `layout:` is the channel_dim in words (utune.spec._layout)
            properties["layout"] = {"enum": list(_LAYOUTS), "description": "where the channels sit (= channel_dim)"}
        required = list(dict.fromkeys([*rule.get("required", []), *options.get("required", [])]))
        variant = {"title": name, "type": "object", "properties": properties, "required": required}
        variants.append({**variant, "additionalProperties": False})
    if variants:  # a kind from the user's code: its options are its own, checked when the spec loads
        ref = {"type": "string", "pattern": REF_PATTERN, "description": "package.module:Class (a kind in your code)"}
        variants.append(
            {
                "title": "a kind from your code",
                "type": "object",
                "properties": {**rule["properties"], "kind": ref},
                "required": rule.get("required", []),
                "additionalProperties": True,
            }
        )
        kind_enum = {"kind": {"anyOf": [{"enum": list(kinds())}, ref]}}
        defs["TunerRule"] = {**rule, "properties": kind_enum, "oneOf": variants}
        defs["TunerRule"].pop("additionalProperties", None)
    return schema

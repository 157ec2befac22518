"""The built-in specs: the repository's ``specs/`` (the reference specs) and the quickstart's method specs,
listed, resolved by name and copied.

One source: in a checkout they are read from ``specs/`` and ``quickstart/`` beside the package; a wheel
carries the same files as package data under ``utune/_data/`` (``setup.py`` maps the two folders there at
build time: nothing is copied in git). A built-in is named by its path below its folder without ``.yaml``:
``vit_b16_cifar100/utuning_dual`` (specs/) and ``quickstart/lora`` (quickstart/methods/; the pre-training
spec is ``quickstart/pretrain``). A name also resolves from its last segments where they are unambiguous
(``adaptformer``, ``resnet50_cifar100/lora``) and with a ``.yaml`` suffix or a ``specs/`` prefix, so the
``Run:`` lines of the spec headers work from any folder. A file of that name in the current folder wins.

The listing with trainable-parameter counts (a build of each spec) is :mod:`utune.runs.catalog`'s: this
module only finds, names and copies files, so the spec loader can resolve a built-in name.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from utune.errors import SpecError, StorageError

PACKAGE = Path(__file__).resolve().parents[1]  # utune/
INDEX = PACKAGE / "_specs_index.json"
QUICKSTART_PREFIX = "quickstart/"


@dataclass(frozen=True)
class Roots:
    """Where the shipped files live: ``specs`` (the reference specs) and ``quickstart`` (its methods, backbone,
    pre-training spec and ``run.py``); ``installed``: from the wheel's package data, else a checkout."""

    specs: Path
    quickstart: Path
    installed: bool


@cache
def roots() -> Roots:
    data = PACKAGE / "_data"
    if (data / "specs").is_dir():
        return Roots(data / "specs", data / "quickstart", True)
    repo = PACKAGE.parent
    if (repo / "specs").is_dir() and (repo / "pyproject.toml").is_file():
        return Roots(repo / "specs", repo / "quickstart", False)
    raise SpecError(
        f"the built-in specs are missing from this installation of utune ({PACKAGE})",
        hint="reinstall utune (pip install --force-reinstall utune), or pass a spec file",
    )


@dataclass(frozen=True)
class Entry:
    """One built-in spec."""

    name: str  # vit_b16_cifar100/lora, quickstart/lora
    path: Path

    @property
    def group(self) -> str:
        return "quickstart" if self.name.startswith(QUICKSTART_PREFIX) else "reference"


def entries() -> list[Entry]:
    """Every built-in spec, reference specs first, each group by name."""
    r = roots()
    found = [Entry(p.relative_to(r.specs).with_suffix("").as_posix(), p) for p in sorted(r.specs.rglob("*.yaml"))]
    qs = sorted((r.quickstart / "methods").glob("*.yaml")) + sorted(r.quickstart.glob("*.yaml"))
    found += [Entry(QUICKSTART_PREFIX + p.stem, p) for p in qs]
    return found


# ---- resolving a name ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """What a spec argument named: ``path`` to read; ``builtin`` the built-in's name when the file is one;
    ``shadowed`` the built-in a file in the current folder took precedence over."""

    path: Path
    builtin: str | None = None
    shadowed: str | None = None

    def describe(self) -> str | None:
        """The line the CLI prints (stderr) when a name was resolved: which file is used."""
        if self.builtin is not None:
            return f"spec {self.builtin}: the built-in one ({self.path})"
        if self.shadowed is not None:
            return (
                f"spec {self.path}: the file in this folder, not the built-in {self.shadowed} "
                f"(utune specs show {self.shadowed})"
            )
        return None


def _key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    for suffix in (".yaml", ".yml"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    if key.startswith("./"):
        key = key[2:]
    if key.startswith("specs/"):
        key = key[len("specs/") :]
    if key.startswith("quickstart/methods/"):
        key = QUICKSTART_PREFIX + key[len("quickstart/methods/") :]
    return key


def matches(name: str) -> list[Entry]:
    """The built-ins a name may mean: its exact name, else those whose name ends with ``/<name>``."""
    key = _key(name)
    if not key:
        return []
    every = entries()
    exact = [e for e in every if e.name == key]
    return exact or [e for e in every if e.name.endswith("/" + key)]


def find(name: str) -> Entry:
    """The one built-in a name means; a SpecError listing the candidates (ambiguous) or the closest names."""
    found = matches(name)
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(e.name for e in found)
        raise SpecError(
            f"{name!r} names {len(found)} built-in specs: {names}", hint=f"give the folder too, e.g. {found[0].name}"
        )
    raise SpecError(f"no built-in spec named {name!r}", hint=_closest_hint(name))


def _closest_hint(name: str) -> str:
    names = [e.name for e in entries()]
    stems = {n.rpartition("/")[2]: n for n in names}
    close = difflib.get_close_matches(_key(name), names, n=3, cutoff=0.6)
    close += [stems[s] for s in difflib.get_close_matches(_key(name), list(stems), n=3, cutoff=0.7)]
    close = list(dict.fromkeys(close))[:3]
    more = f"did you mean {', '.join(close)}? " if close else ""
    return more + "`utune specs` lists the built-in specs (`--grep WORD` filters them)"


def is_builtin_name(name: str) -> bool:
    """Whether ``name`` means exactly one built-in spec (False, too, where the installation has none)."""
    try:
        return len(matches(name)) == 1
    except SpecError:
        return False


def resolve(arg: str | Path) -> Resolved:
    """A spec argument as the CLI reads it: an existing file (it wins), else a built-in spec's name.

    Raises SpecError when it is neither (the error names the closest built-ins), or when a name is ambiguous.
    """
    text = str(arg)
    path = Path(text).expanduser()
    if path.is_file():
        try:
            found = matches(text) if not path.is_absolute() else []
        except SpecError:  # no built-ins in this installation: the file is all there is
            found = []
        shadowed = found[0].name if len(found) == 1 and found[0].path.resolve() != path.resolve() else None
        return Resolved(path, shadowed=shadowed)
    if path.is_dir():
        raise SpecError(f"{path} is a folder, not a spec file", hint="pass the spec's .yaml file")
    found = matches(text)
    if len(found) == 1:
        return Resolved(found[0].path, builtin=found[0].name)
    if found:
        find(text)  # raises: ambiguous
    raise SpecError(f"spec file not found: {text} (nor a built-in spec of that name)", hint=_closest_hint(text))


# ---- what the listing shows ---------------------------------------------------------------------------

_ARXIV = re.compile(r"arXiv:? ?(\d{4}\.\d{4,5})")
_LABEL = re.compile(r"^[A-Z][A-Za-z ]*:")  # a header paragraph: "Reproduces:", "Run:", "Backbone:"


def header(text: str) -> list[str]:
    """The leading comment lines of a spec, without their ``#``."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def method_of(text: str) -> str:
    """The header's first sentence up to its first colon: ``U-Tuning/12, Dual U-Tuner``, ``LoRA (Hu et al.
    2021) on the query and value projections of every attention``."""
    lines = header(text)
    if not lines:
        return ""
    first = lines[0]
    depth = 0
    for i, ch in enumerate(first):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == ":" and depth == 0 and first[i + 1 : i + 2] in (" ", ""):
            return first[:i].strip()
    return first.rstrip(".").strip()


def papers_of(text: str) -> list[str]:
    """The arXiv ids the header's ``Reproduces:`` paragraph cites (the method's papers; a ``Backbone:``
    paragraph's are the backbone's), in order; none for specs that reproduce no paper."""
    ids: list[str] = []
    inside = False
    for line in header(text):
        if _LABEL.match(line):
            inside = line.startswith("Reproduces:")
        elif not line.startswith(" "):
            inside = False
        if inside:
            ids += [i for i in _ARXIV.findall(line) if i not in ids]
    return ids


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_name(text: str) -> str:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return str(model.get("name", "")) if isinstance(model, dict) else ""


# ---- copying ------------------------------------------------------------------------------------------

_PATH_KEYS = (("model", "pretrained"), ("data", "root"))


def copy(name: str, dest: Path | None = None, *, force: bool = False) -> tuple[Entry, Path, list[str]]:
    """Write an editable copy of a built-in spec: ``dest`` (a file, or a folder to put it in; default: the
    current folder), refusing to overwrite unless ``force``. A relative path the spec holds (the quickstart
    methods' ``model.pretrained: ../vit_fmnist6.safetensors``) is rewritten to the absolute path it means,
    so the copy works where it lands. Returns the entry, the file written and the keys rewritten."""
    from utune._fs import make_dir, write_text_atomic

    entry = find(name)
    target = Path(dest).expanduser() if dest is not None else Path(entry.path.name)
    if target.is_dir() or (dest is not None and str(dest).endswith(("/", "\\"))):
        target = target / entry.path.name
    if target.exists() and not force:
        raise StorageError(f"{target} exists: not overwritten", hint="pass --force to replace it, or another DEST")
    text, rewritten = _absolute_paths(entry.path.read_text(encoding="utf-8"), entry.path.parent)
    make_dir(target.parent.resolve())
    write_text_atomic(target, text, what="spec copy")
    return entry, target, rewritten


def _absolute_paths(text: str, base: Path) -> tuple[str, list[str]]:
    import yaml

    data = yaml.safe_load(text)
    done = []
    for section, key in _PATH_KEYS:
        part = data.get(section) if isinstance(data, dict) else None
        value = part.get(key) if isinstance(part, dict) else None
        if not isinstance(value, str) or value.strip().lower() in ("true", "false") or Path(value).is_absolute():
            continue
        line = re.compile(rf"^(\s*{key}:\s*){re.escape(value)}(?=\s|$)", re.M)
        found = list(line.finditer(text))
        if len(found) == 1:  # the one line that says it: replaced there, comments and layout kept
            text = text[: found[0].end(1)] + str((base / value).resolve()) + text[found[0].end() :]
            done.append(f"{section}.{key}")
    return text, done


# ---- the index ----------------------------------------------------------------------------------------

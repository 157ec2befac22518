"""Your own images listed in a CSV file: ``--dataset csv --data-dir labels.csv`` (in a spec:
``data: {dataset: csv, root: labels.csv}``).

The file has a header line with (at least) the columns ``path`` and ``label``; paths are relative to the
file's folder (or absolute)::

    path,label
    photos/001.jpg,cat
    photos/002.jpg,dog

Labels are class **names** (the classes are the sorted distinct names) or **integers** (class indices
``0..K-1``, each used at least once; their names are the digits). An optional ``split`` column (``train``,
``val`` or ``test``) puts rows in splits; without it every row is training data and ``data.val_size`` /
``data.test_size`` carve stratified val and test splits. Listed files that do not exist, an unknown split
name, fewer than two classes or an integer class with no row are refused, with the line.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from utune.errors import DataError

from ._common import ImageList, Source, Transform, bad_split

SPLITS = ("train", "val", "test")
_HINT = "a header line `path,label` (optionally `,split`), then one image per line, paths relative to the file"


@dataclass(frozen=True)
class Table:
    """A parsed CSV file: class names and ``(absolute path, class index)`` per split."""

    names: list[str]
    rows: dict[str, list[tuple[str, int]]]
    has_split: bool


def _file(source: Source) -> Path:
    path = source.root
    if not source.explicit:
        raise DataError(
            "dataset 'csv' needs the CSV file",
            hint="pass --data-dir labels.csv (in a spec: data: {dataset: csv, root: labels.csv})",
        )
    if path.is_dir():
        raise DataError(f"dataset 'csv': {path} is a folder, not a CSV file", hint="--data-dir names the .csv file")
    if not path.is_file():
        raise DataError(f"dataset 'csv': {path} not found", hint="--data-dir names the .csv file listing the images")
    return path


def read(source: Source) -> Table:
    path = _file(source)
    stat = path.stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read(name: str, size: int, mtime_ns: int) -> Table:  # size and mtime: a changed file is read again
    path = Path(name)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path}: {err}", hint=_HINT) from None
    if not lines:
        raise DataError(f"{path} is empty", hint=_HINT)
    header = [h.strip().lower() for h in lines[0]]
    if "path" not in header or "label" not in header:
        raise DataError(f"{path}:1: the header must name the columns path and label, got {lines[0]!r}", hint=_HINT)
    col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    raw: list[tuple[int, str, str, str]] = []
    for number, row in enumerate(lines[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataError(f"{path}:{number}: expected {len(header)} columns, got {row!r}", hint=_HINT)
        split = row[col["split"]].strip().lower() if "split" in col else "train"
        if split not in SPLITS:
            raise DataError(f"{path}:{number}: unknown split {split!r}", hint="a split is train, val or test")
        raw.append((number, row[col["path"]].strip(), row[col["label"]].strip(), split))
    if not raw:
        raise DataError(f"{path} lists no images", hint=_HINT)
    names, index = _classes(path, [(n, label) for n, _, label, _ in raw])
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    missing = []
    for number, rel, label, split in raw:
        image = Path(rel).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            missing.append(f"{image} (line {number})")
        rows[split].append((str(image), index[label]))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"{len(missing)} image(s) listed in {path} do not exist: {', '.join(missing[:3])}{more}",
            hint=f"paths are relative to {path.parent}",
        )
    return Table(names, rows, "split" in col)


def _classes(path: Path, labels: list[tuple[int, str]]) -> tuple[list[str], dict[str, int]]:
    """Names and the label → index map: integers are indices, anything else names (sorted)."""
    for number, label in labels:
        if not label:
            raise DataError(f"{path}:{number}: empty label", hint=_HINT)
    distinct = {label for _, label in labels}
    if all(label.isdigit() for label in distinct):
        count = max(int(label) for label in distinct) + 1
        unused = sorted(set(range(count)) - {int(label) for label in distinct})
        if unused:
            raise DataError(
                f"{path}: integer labels are class indices 0..{count - 1}, but class {unused[0]} has no image",
                hint="number the classes 0..K-1 without gaps, or write class names as labels",
            )
        names = [str(i) for i in range(count)]
        index = {label: int(label) for label in distinct}
    else:
        names = sorted(distinct)
        index = {name: i for i, name in enumerate(names)}
    if len(names) < 2:
        raise DataError(f"{path}: every image has the label {names[0]!r}; a classifier needs two or more classes")
    return names, index


def count_classes(source: Source) -> int:
    return len(read(source).names)


def class_names(source: Source) -> list[str]:
    return read(source).names


def present(source: Source) -> tuple[str, ...]:
    table = read(source)
    return tuple(s for s in SPLITS if table.rows[s])


def load(source: Source, split: str, transform: Transform) -> Dataset:
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    table = read(source)
    if not table.rows[split]:
        raise DataError(
            f"dataset 'csv': {source.root} has no {split!r} rows"
            + ("" if table.has_split else " (it has no split column: every row is training data)"),
            hint=f"set data.val_size (e.g. 0.2) and data.test_size to carve {split} from the training rows",
        )
    return ImageList(table.rows[split], transform)

"""Shared pieces of the dataset readers: where data lives, image lists, list files, errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from utune.errors import DataError

from ._images import read_image

Transform = Callable[[Image.Image], Any]
Sample = tuple[str, int]

DEFAULT_BASE = "~/.cache/utune/data"


@dataclass(frozen=True)
class Source:
    """Where one dataset lives and what the reader may do about it."""

    name: str  # canonical dataset name
    root: Path  # resolved, user-expanded
    explicit: bool  # the user set ``data.root`` (no fallback locations then)
    download: bool  # may fetch missing files from the official source


def data_base() -> Path:
    """The folder holding every dataset's default root: ``$UTUNE_DATA`` or ``~/.cache/utune/data``."""
    return Path(os.environ.get("UTUNE_DATA") or DEFAULT_BASE).expanduser()


def resolve_root(root: str | None, default_dir: str) -> Path:
    """``root`` (user-expanded) when given, else ``<data base>/<default_dir>``."""
    return Path(root).expanduser() if root else data_base() / default_dir


def not_found(name: str, looked: Iterable[Path], hint: str) -> DataError:
    """The one error for a dataset that is not where we looked."""
    where = ", ".join(str(p) for p in looked)
    return DataError(f"dataset {name!r} not found: looked in {where}", hint=hint)


def bad_split(name: str, split: str, splits: Sequence[str]) -> DataError:
    return DataError(f"dataset {name!r} has no split {split!r}", hint=f"use one of: {', '.join(splits)}")


class ImageList(Dataset):
    """``(path, label)`` pairs read with PIL as RGB, then ``transform``: returns ``(image, label)``."""

    def __init__(self, samples: Sequence[Sample], transform: Transform | None = None) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        rgb = read_image(path)  # a damaged file: one line naming it, even from a DataLoader worker
        return (self.transform(rgb) if self.transform is not None else rgb), label


def check_samples(name: str, samples: Sequence[Sample], listed_in: Path, base: Path, hint: str) -> None:
    """Fail early, with the path, when a list is empty or its first image is not on disk."""
    if not samples:
        raise DataError(f"dataset {name!r}: {listed_in} lists no images", hint=hint)
    first = Path(samples[0][0])
    if not first.is_file():
        raise DataError(
            f"dataset {name!r}: image {first} listed in {listed_in} does not exist",
            hint=f"paths in {listed_in.name} are relative to {base}; {hint}",
        )


def read_json_labels(path: Path) -> dict[str, int]:
    """A VPT split file: a JSON object mapping a relative image path to an integer label."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read split file {path}: {err}", hint="re-download the VPT split files") from None
    if not isinstance(raw, dict):
        raise DataError(f"split file {path} is not a JSON object", hint="expected {relative/path.jpg: label}")
    try:
        return {str(key): int(value) for key, value in raw.items()}
    except (TypeError, ValueError):
        raise DataError(
            f"split file {path} has a non-integer label", hint="expected {relative/path.jpg: label}"
        ) from None


def read_list_file(path: Path) -> list[Sample]:
    """A list file: one ``relative/path.jpg label`` per line (blank lines skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read list file {path}: {err}", hint="check the file's permissions") from None
    samples: list[Sample] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(
                f"{path}:{number}: expected 'relative/path.jpg label', got {line.strip()!r}",
                hint="fix or re-download the list file",
            )
        samples.append((parts[0], int(parts[1])))
    return samples


def read_columns(path: Path, columns: int) -> list[list[str]]:
    """A whitespace-separated text table (CUB/NABirds metadata), every row with ``columns`` fields."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}", hint="check the file's permissions") from None
    rows: list[list[str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = line.split(maxsplit=columns - 1)
        if len(row) != columns:
            raise DataError(f"{path}:{number}: expected {columns} fields", hint="re-extract the dataset archive")
        rows.append(row)
    return rows

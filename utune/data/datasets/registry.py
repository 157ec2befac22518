"""Dataset names → readers. Names are matched ignoring case, ``-`` and ``_`` (``fashion_mnist`` works)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch.utils.data import Dataset

from utune.errors import DataError

from . import cifar, csvlist, digits, fashion_mnist, fgvc, imagefolder, vtab
from ._common import Source, Transform

Loader = Callable[[Source, str, Transform], Dataset]

TRAIN_SPLITS = frozenset({"train", "trainval", "train800"})  # get training augmentation


@dataclass(frozen=True)
class Entry:
    """One dataset: its reader, class count, splits and default folder under the data base."""

    name: str
    load: Loader
    classes: Callable[[Source], int]
    splits: tuple[str, ...]
    default_dir: str
    augment: bool = True  # False: a plain resize for every split (VTAB)
    downloadable: bool = False  # --download can fetch it from the official source (torchvision)
    names: Callable[[Source], list[str]] | None = None  # class names (None: the reader's ``classes``, if any)
    present: Callable[[Source], tuple[str, ...]] | None = None  # the splits it holds (None: ``splits``)

    def held(self, source: Source) -> tuple[str, ...]:
        """The splits this dataset has as such (``test`` aliased to ``val`` or the reverse counts)."""
        return self.present(source) if self.present is not None else self.splits


def _constant(count: int, source: Source) -> int:
    return count


def _imagefolder_classes(source: Source) -> int:
    return len(imagefolder.classes(source.root, source.name))


def _imagefolder_names(source: Source) -> list[str]:
    return imagefolder.classes(source.root, source.name)


def _imagefolder_present(source: Source) -> tuple[str, ...]:
    return imagefolder.present(source.root)


def _entries() -> dict[str, Entry]:
    entries = [
        Entry(name, cifar.load, partial(_constant, n), cifar.SPLITS, name, downloadable=True)
        for name, n in cifar.NUM_CLASSES.items()
    ]
    entries += [
        Entry(name, fgvc.load, partial(_constant, n), fgvc.SPLITS, name, downloadable=name == "flowers102")
        for name, n in fgvc.NUM_CLASSES.items()
    ]
    entries += [
        Entry(f"vtab-{task}", vtab.load, vtab.count_classes, vtab.SPLITS, "vtab-1k", augment=False)
        for task in vtab.TASKS
    ]
    entries += [
        Entry(
            "imagefolder",
            imagefolder.load,
            _imagefolder_classes,
            imagefolder.SPLITS,
            "imagefolder",
            names=_imagefolder_names,
            present=_imagefolder_present,
        ),
        Entry(
            "csv",
            csvlist.load,
            csvlist.count_classes,
            csvlist.SPLITS,
            "csv",
            names=csvlist.class_names,
            present=csvlist.present,
        ),
        Entry("digits", digits.load, partial(_constant, digits.NUM_CLASSES), digits.SPLITS, "digits"),
        Entry(
            "fashion-mnist",
            fashion_mnist.load,
            partial(_constant, fashion_mnist.NUM_CLASSES),
            fashion_mnist.SPLITS,
            "fashion-mnist",
            downloadable=True,
        ),
    ]
    return {entry.name: entry for entry in entries}


ENTRIES = _entries()
_ALIASES = {
    "cub200": "cub",
    "cub2002011": "cub",
    "flowers": "flowers102",
    "oxfordflowers102": "flowers102",
    "cars": "stanford_cars",
    "dogs": "stanford_dogs",
    "fmnist": "fashion-mnist",
}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


_BY_KEY = {**{_key(name): name for name in ENTRIES}, **_ALIASES}


def names() -> list[str]:
    """Every dataset name, in the order of the docs."""
    return list(ENTRIES)


def lookup(name: str | None) -> Entry:
    """The entry for ``name``; a one-line :class:`DataError` with the closest names otherwise."""
    if not name:
        raise DataError("no dataset set", hint=f"set data.dataset to one of: {', '.join(_short_list())}")
    canonical = _BY_KEY.get(_key(name))
    if canonical is not None:
        return ENTRIES[canonical]
    close = difflib.get_close_matches(name.lower(), list(ENTRIES), n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    elif _key(name).startswith("vtab"):
        hint = f"VTAB tasks: {', '.join(vtab.TASKS)}"
    else:
        hint = f"known datasets: {', '.join(_short_list())}"
    raise DataError(f"unknown dataset {name!r}", hint=hint)


def _short_list() -> list[str]:
    return [name for name in ENTRIES if not name.startswith("vtab-")] + ["vtab-<task>"]

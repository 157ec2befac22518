"""Any dataset in torchvision's ImageFolder layout.

Layout: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``, optionally
``<root>/test/<class>/<image>``. Classes are the sorted folder names under ``train/``, and every split
uses that same class → index map (a split may lack some classes, but may not add new ones). Splits:
``train``, ``val``, ``test`` (= ``val`` when there is no ``test/`` folder).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from utune.errors import DataError

from ._common import Source, Transform, bad_split, not_found

SPLITS = ("train", "val", "test")


def _hint(root: Path) -> str:
    return f"arrange the images as {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"


def classes(root: Path, name: str = "imagefolder") -> list[str]:
    """The sorted class folder names under ``<root>/train``."""
    train = root / "train"
    if not train.is_dir():
        raise not_found(name, [train], _hint(root))
    found = sorted(entry.name for entry in train.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise DataError(f"dataset {name!r}: {train} has no class folders", hint=_hint(root))
    return found


class FixedClassFolder(ImageFolder):
    """An :class:`ImageFolder` whose class → index map is given (the training split's)."""

    def __init__(self, root: str, classes: list[str], transform: Transform | None = None) -> None:
        self._fixed_classes = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: index for index, name in enumerate(self._fixed_classes)}


def _split_dir(root: Path, split: str) -> Path:
    if split == "test" and not (root / "test").is_dir():
        return root / "val"
    return root / split


def load(source: Source, split: str, transform: Transform) -> Dataset:
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    known = classes(source.root, source.name)
    folder = _split_dir(source.root, split)
    if not folder.is_dir():
        raise not_found(source.name, [folder], _hint(source.root))
    extra = sorted({e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith(".")} - set(known))
    if extra:
        raise DataError(
            f"dataset {source.name!r}: {folder} has class folder {extra[0]!r} that train/ lacks",
            hint=f"add {source.root / 'train' / extra[0]}/ with training images or remove it from {folder.name}/",
        )
    dataset = FixedClassFolder(str(folder), known, transform)
    if len(dataset) == 0:
        raise DataError(f"dataset {source.name!r}: no images found under {folder}", hint=_hint(source.root))
    return dataset

"""Your own images in class folders, as torchvision's ImageFolder reads them. Two layouts:

- **split**: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``, optionally
  ``<root>/test/<class>/<image>``. Classes are the sorted folder names under ``train/``, and every split
  uses that same class → index map (a split may lack some classes, but may not add new ones).
- **flat**: ``<root>/<class>/<image>`` (no ``train/``): one pool of images, from which ``data.val_size``
  (and ``data.test_size``) carve class-stratified val and test splits (:mod:`utune.data.derive`).

Images may sit in sub-folders of a class folder. A class folder with no image in it is refused by name
(as torchvision's ImageFolder does: it would be an output never learned), and so is a dataset with fewer
than two classes. Splits: ``train``, ``val``, ``test``; ``test`` exists only as a ``test/`` folder (or
``data.test_size``): :func:`present` says which ones the folder has (``utune eval`` scores ``val`` and
says so when there is no test split).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from utune.errors import DataError

from ._common import Source, Transform, bad_split, not_found
from ._images import is_image, read_image

SPLITS = ("train", "val", "test")


def _hint(root: Path) -> str:
    return (
        f"arrange the images as {root}/<class>/*.jpg (then set data.val_size, e.g. 0.2) or as "
        f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
    )


def flat(root: Path) -> bool:
    """``<root>/<class>/...`` rather than ``<root>/train/<class>/...``."""
    return not (root / "train").is_dir()


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: Path) -> bool:
    for _, _, names in os.walk(folder, followlinks=True):
        if any(is_image(Path(n)) for n in names):
            return True
    return False


def classes(root: Path, name: str = "imagefolder") -> list[str]:
    """The sorted class folder names (under ``<root>/train``, or ``<root>`` for a flat folder); a class
    folder without images and fewer than two classes are refused."""
    if not root.is_dir():
        raise not_found(name, [root], _hint(root))
    folder = root if flat(root) else root / "train"
    found = _class_dirs(folder)
    if flat(root) and {"val", "test"} & set(found):
        raise DataError(f"dataset {name!r}: {root} has a val/ or test/ folder but no train/", hint=_hint(root))
    if not found:
        raise DataError(f"dataset {name!r}: {folder} has no class folders", hint=_hint(root))
    empty = [c for c in found if not _has_image(folder / c)]
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        shown = ", ".join(str(folder / c) for c in empty[:5]) + more
        raise DataError(
            f"dataset {name!r}: class folder{'s' if len(empty) > 1 else ''} without images: {shown}",
            hint="add images to it or remove it: every class folder is one output of the model",
        )
    if len(found) < 2:
        raise DataError(
            f"dataset {name!r}: {folder} has only one class folder ({found[0]!r}); a classifier needs two or more",
            hint=_hint(root),
        )
    return found


def present(root: Path) -> tuple[str, ...]:
    """The splits the folder itself holds: ``train`` alone for a flat folder."""
    if flat(root):
        return ("train",)
    return ("train", "val") + (("test",) if (root / "test").is_dir() else ())


class FixedClassFolder(ImageFolder):
    """An :class:`ImageFolder` whose class → index map is given (the training split's); a damaged file
    raises one :class:`~utune.data.datasets._images.UnreadableImageError` naming it."""

    def __init__(self, root: str, classes: list[str], transform: Transform | None = None) -> None:
        self._fixed_classes = list(classes)
        super().__init__(root, transform=transform, loader=read_image, allow_empty=True)

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
    if flat(source.root):
        if split != "train":
            raise DataError(
                f"dataset {source.name!r}: {source.root} is one folder of classes (no train/ and val/), so it has "
                f"no {split!r} split of its own",
                hint="set data.val_size (e.g. 0.2) and data.test_size to carve stratified val and test splits "
                f"from it, or arrange {source.root}/train/<class>/ and {source.root}/val/<class>/",
            )
        folder = source.root
    else:
        folder = _split_dir(source.root, split)
        if not folder.is_dir():
            raise not_found(source.name, [folder], _hint(source.root))
        extra = sorted(set(_class_dirs(folder)) - set(known))
        if extra:
            raise DataError(
                f"dataset {source.name!r}: {folder} has class folder {extra[0]!r} that train/ lacks",
                hint=f"add {source.root / 'train' / extra[0]}/ with training images or remove it from {folder.name}/",
            )
    dataset = FixedClassFolder(str(folder), known, transform)
    if len(dataset) == 0:
        raise DataError(f"dataset {source.name!r}: no images found under {folder}", hint=_hint(source.root))
    return dataset

"""CIFAR-10 and CIFAR-100 in the official "python version" layout, read by torchvision.

Layout: ``<root>/cifar-100-python/{train,test,meta}`` or
``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (what the official
``.tar.gz`` extracts to). ``root`` may also point at that inner folder itself.

Splits: ``train`` (50,000), ``test`` (10,000) and ``val`` = ``test``: the VPT-style convention for
CIFAR-100 trains on all 50k and reports on the 10k test set, so there is no held-out validation set.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from utune.errors import DataError

from ._common import Source, Transform, bad_split, not_found

SPLITS = ("train", "val", "test")
CLASSES = {"cifar100": CIFAR100, "cifar10": CIFAR10}
NUM_CLASSES = {"cifar100": 100, "cifar10": 10}


def _files(cls: type[CIFAR10]) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _torchvision_root(root: Path, cls: type[CIFAR10]) -> Path:
    """The folder that holds ``cls.base_folder``; accepts that inner folder as ``root`` too."""
    if not (root / cls.base_folder).is_dir() and root.name == cls.base_folder:
        return root.parent
    return root


def _hint(root: Path, cls: type[CIFAR10]) -> str:
    return (
        f"pass --download, or fetch it with `mkdir -p {root} && curl -L {cls.url} | tar -xz -C {root}`, "
        f"or set data.root to the folder that holds {cls.base_folder}/"
    )


def _damaged(folder: Path, cls: type[CIFAR10]) -> list[str]:
    """Files whose MD5 differs from the official archive's (what torchvision's integrity check tests)."""
    from torchvision.datasets.utils import check_integrity

    listed = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return [name for name, md5 in listed if (folder / name).is_file() and not check_integrity(str(folder / name), md5)]


def load(source: Source, split: str, transform: Transform) -> Dataset:
    """The ``split`` of CIFAR-10/100 through torchvision's reader (checksums verified)."""
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    cls = CLASSES[source.name]
    root = _torchvision_root(source.root, cls)
    folder = root / cls.base_folder
    missing = [name for name in _files(cls) if not (folder / name).is_file()]
    if missing and not source.download:
        raise not_found(source.name, [folder], _hint(root, cls))
    try:
        return cls(str(root), train=split == "train", transform=transform, download=bool(missing))
    except RuntimeError as err:
        damaged = [] if missing else _damaged(folder, cls)
        if damaged:
            raise DataError(
                f"dataset {source.name!r} in {folder}: the MD5 checksum of {', '.join(damaged)} differs from the "
                f"official {source.name.upper()} files (damaged, or not the official archive)",
                hint=f"delete {folder} and pass --download, or extract the official archive there again",
            ) from None
        raise DataError(f"dataset {source.name!r} in {folder} is unreadable: {err}", hint=_hint(root, cls)) from None
    except (OSError, pickle.UnpicklingError, KeyError, ValueError) as err:
        problem = (
            f"could not download {source.name} into {root}"
            if missing
            else f"dataset {source.name!r} in {folder} is unreadable or corrupted"
        )
        raise DataError(f"{problem}: {err}", hint=_hint(root, cls)) from None

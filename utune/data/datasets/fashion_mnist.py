"""Fashion-MNIST (60,000 train / 10,000 test 28×28 grayscale images, 10 classes), read by torchvision.

torchvision's :class:`~torchvision.datasets.FashionMNIST` reads the four *uncompressed* idx files
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` from ``<root>/FashionMNIST/raw/``. The files are looked for, raw or
gzipped (``*.gz``), in this order:

1. ``<root>/FashionMNIST/raw/`` (torchvision's layout);
2. ``<root>/`` itself (the four files as the official site ships them);
3. only when ``data.root`` is not set: ``/usr/share/datasets/fashion-mnist/``, where Debian's
   ``dataset-fashion-mnist`` package installs the gzipped files.

Files found outside torchvision's layout are decompressed (or linked) into
``<root>/FashionMNIST/raw/`` — or, when ``<root>`` is read-only, into
``<data base>/fashion-mnist/FashionMNIST/raw/`` — once; later runs read them from there.

Splits: ``train``, ``test`` and ``val`` = ``test`` (the dataset has no official validation set).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST

from utune.errors import DataError

from ._common import Source, Transform, bad_split, data_base, not_found

SPLITS = ("train", "val", "test")
NUM_CLASSES = 10
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
OFFICIAL_URL = "https://github.com/zalandoresearch/fashion-mnist"


def _raw_dir(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (raw first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _candidates(source: Source) -> list[Path]:
    folders = [_raw_dir(source.root), source.root]
    return folders if source.explicit else [*folders, DEBIAN_DIR]


def _complete(folder: Path) -> bool:
    return all(_find(folder, name) is not None for name in FILES)


def _ready(root: Path) -> bool:
    """torchvision can read ``root`` as it is."""
    return all((_raw_dir(root) / name).is_file() for name in FILES)


def _place(found: Path, target: Path) -> None:
    """Decompress (``.gz``) or link ``found`` to ``target``, atomically, so concurrent ranks agree."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        if found.suffix == ".gz":
            with gzip.open(found, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            os.unlink(tmp)
            try:
                os.symlink(found.resolve(), tmp)
            except OSError:
                shutil.copyfile(found, tmp)
        if not os.path.islink(tmp):
            os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _materialise(folder: Path, root: Path) -> None:
    raw = _raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        found = _find(folder, name)
        if not (raw / name).is_file() and found is not None:  # found: _complete checked
            _place(found, raw / name)


def _prepare(source: Source) -> Path:
    """The root torchvision should read, after placing files found elsewhere into its layout."""
    if _ready(source.root):
        return source.root
    folder = next((f for f in _candidates(source) if _complete(f)), None)
    if folder is None:
        if source.download:
            return source.root  # torchvision fetches into <root>/FashionMNIST/raw
        raise not_found(source.name, _candidates(source), _hint(source.root))
    for root in (source.root, data_base() / "fashion-mnist"):
        try:
            _materialise(folder, root)
            return root
        except PermissionError:
            continue
        except OSError as err:  # a corrupt .gz, a full disk
            raise DataError(f"could not unpack Fashion-MNIST from {folder}: {err}", hint=_hint(root)) from None
    raise DataError(
        f"could not unpack Fashion-MNIST from {folder}: no writable folder",
        hint="set data.root (or UTUNE_DATA) to a writable folder",
    )


def _hint(root: Path) -> str:
    return (
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four *-ubyte.gz files "
        f"from {OFFICIAL_URL} into {root}, or pass --download"
    )


def load(source: Source, split: str, transform: Transform) -> Dataset:
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    root = _prepare(source)
    try:
        return FashionMNIST(str(root), train=split == "train", transform=transform, download=source.download)
    except (OSError, RuntimeError, AssertionError, ValueError, TypeError) as err:
        raise DataError(
            f"could not read Fashion-MNIST from {_raw_dir(root)}: {err or type(err).__name__}",
            hint=_hint(root),
        ) from None

"""The five FGVC datasets of VPT: CUB-200-2011, NABirds, Oxford Flowers-102, Stanford Cars, Stanford Dogs.

**VPT layout (preferred).** VPT distributes ``train.json``, ``val.json`` and ``test.json`` per dataset:
a JSON object mapping an image path to its label. They go in ``<root>`` next to the images; the paths
are relative to the dataset's image folder, as in VPT's loaders:

==============  =======================  ==================================================
dataset         ``<root>``               images at
==============  =======================  ==================================================
cub             ``CUB_200_2011/``        ``<root>/images/<class>/<file>.jpg``
nabirds         ``nabirds/``             ``<root>/images/<class>/<file>.jpg``
flowers102      the flowers folder       ``<root>/<path>`` (e.g. ``jpg/image_00001.jpg``)
stanford_cars   the cars folder          ``<root>/<path>`` (e.g. ``cars_train/00001.jpg``)
stanford_dogs   the dogs folder          ``<root>/Images/<synset-breed>/<file>.jpg``
==============  =======================  ==================================================

(A path that is not under the image folder is also looked up under ``<root>``.) Splits: ``train``,
``val``, ``test`` and ``trainval`` (= train + val, VPT's final-run training set). Labels are used as
they are when they lie in ``0..K-1``; otherwise (e.g. raw NABirds class ids) the sorted set of labels
across the three files is mapped to ``0..K-1``, as VPT does.

**Official layouts (fallback, when no ``train.json`` is present).** These have no validation set:
``val`` = ``test`` and ``trainval`` = ``train`` (except Flowers-102, which has an official val).

* cub: ``<root>`` (or ``<root>/CUB_200_2011``) with ``images.txt``, ``image_class_labels.txt``,
  ``train_test_split.txt`` and ``images/``.
* nabirds: ``<root>`` (or ``<root>/nabirds``) with the same three text files and ``images/``; the
  555 class ids are mapped, sorted, to ``0..554``.
* flowers102: torchvision's layout ``<root>/flowers-102/{jpg/,imagelabels.mat,setid.mat}``.
* stanford_cars: torchvision's layout ``<root>/stanford_cars/{cars_train/,cars_test/,devkit/,
  cars_test_annos_withlabels.mat}``.
* stanford_dogs: ``<root>/Images/``, ``<root>/train_list.mat``, ``<root>/test_list.mat``.

``<root>`` may also name the inner folder (``flowers-102``, ``stanford_cars``) in the torchvision cases.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import Flowers102, StanfordCars

from utune.errors import DataError

from ._common import (
    ImageList,
    Sample,
    Source,
    Transform,
    bad_split,
    check_samples,
    not_found,
    read_columns,
    read_json_labels,
)

SPLITS = ("train", "val", "test", "trainval")
NUM_CLASSES = {"cub": 200, "nabirds": 555, "flowers102": 102, "stanford_cars": 196, "stanford_dogs": 120}
_VPT_IMAGE_DIR = {"cub": "images", "nabirds": "images", "stanford_dogs": "Images"}
_INNER = {"cub": "CUB_200_2011", "nabirds": "nabirds", "flowers102": "flowers-102", "stanford_cars": "stanford_cars"}
_PAGES = {
    "cub": "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    "nabirds": "https://dl.allaboutbirds.org/nabirds",
    "flowers102": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    "stanford_cars": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
    "stanford_dogs": "http://vision.stanford.edu/aditya86/ImageNetDogs/",
}
VPT_URL = "https://github.com/KMnP/vpt"


def _hint(name: str, root: Path) -> str:
    return (
        f"get the images from {_PAGES[name]} and VPT's train/val/test.json split files ({VPT_URL}, "
        f"'FGVC' data preparation) into {root}, or set data.root to where they are"
    )


def load(source: Source, split: str, transform: Transform) -> Dataset:
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    if (source.root / "train.json").is_file():
        return _load_vpt(source, split, transform)
    return _NATIVE[source.name](source, split, transform)


# --- VPT json layout ---------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _vpt_annotations(root: str) -> dict[str, dict[str, int]]:
    files = {split: Path(root) / f"{split}.json" for split in ("train", "val", "test")}
    return {split: read_json_labels(path) for split, path in files.items() if path.is_file()}


def _label_map(name: str, root: Path, labels: set[int]) -> dict[int, int]:
    """VPT labels: as they are when in ``0..K-1``, else the sorted set mapped to ``0..K-1``."""
    if all(0 <= label < NUM_CLASSES[name] for label in labels):
        return {label: label for label in labels}
    return _sorted_map(name, root, labels)


def _sorted_map(name: str, where: Path, labels: set[int]) -> dict[int, int]:
    if len(labels) > NUM_CLASSES[name]:
        raise DataError(
            f"dataset {name!r}: {where} has {len(labels)} distinct labels, expected at most {NUM_CLASSES[name]}",
            hint=f"check that {where} holds {name}",
        )
    return {label: index for index, label in enumerate(sorted(labels))}


def _one_based(name: str, where: Path, labels: set[int]) -> dict[int, int]:
    bad = sorted(label for label in labels if not 1 <= label <= NUM_CLASSES[name])
    if bad:
        raise DataError(
            f"dataset {name!r}: {where} has label {bad[0]}, expected 1..{NUM_CLASSES[name]}",
            hint=f"check that {where} belongs to {name}",
        )
    return {label: label - 1 for label in labels}


def _image_base(name: str, root: Path, first: str) -> Path:
    preferred = root / _VPT_IMAGE_DIR.get(name, "")
    for base in (preferred, root):
        if (base / first).is_file():
            return base
    raise DataError(
        f"dataset {name!r}: image {first!r} from {root / 'train.json'} is neither under {preferred} nor {root}",
        hint=_hint(name, root),
    )


def _load_vpt(source: Source, split: str, transform: Transform) -> Dataset:
    annotations = _vpt_annotations(str(source.root))
    parts = ("train", "val") if split == "trainval" else (split,)
    missing = [source.root / f"{part}.json" for part in parts if part not in annotations]
    if missing:
        raise not_found(source.name, missing, _hint(source.name, source.root))
    mapping = _label_map(source.name, source.root, {v for a in annotations.values() for v in a.values()})
    entries = [(path, label) for part in parts for path, label in annotations[part].items()]
    if not entries:
        raise DataError(
            f"dataset {source.name!r}: {source.root}/{split}.json is empty", hint=_hint(source.name, source.root)
        )
    base = _image_base(source.name, source.root, entries[0][0])
    samples = [(str(base / path), mapping[label]) for path, label in entries]
    return ImageList(samples, transform)


# --- official layouts -----------------------------------------------------------------------------------


def _first_with(roots: list[Path], marker: str) -> Path | None:
    return next((root for root in roots if (root / marker).exists()), None)


def _looked(source: Source, markers: list[str]) -> list[Path]:
    return [source.root / "train.json", *(source.root / m for m in markers)]


def _load_cub_style(source: Source, split: str, transform: Transform) -> Dataset:
    """CUB-200-2011 and NABirds: images.txt, image_class_labels.txt, train_test_split.txt, images/."""
    inner = source.root / _INNER[source.name]
    base = _first_with([source.root, inner], "images.txt")
    if base is None:
        raise not_found(
            source.name, _looked(source, ["images.txt", f"{inner.name}/images.txt"]), _hint(source.name, source.root)
        )
    paths = dict(read_columns(base / "images.txt", 2))
    labels = {key: int(value) for key, value in read_columns(base / "image_class_labels.txt", 2)}
    is_train = {key: value.strip() == "1" for key, value in read_columns(base / "train_test_split.txt", 2)}
    label_map = _one_based if source.name == "cub" else _sorted_map  # NABirds ids are sparse
    mapping = label_map(source.name, base / "image_class_labels.txt", set(labels.values()))
    want_train = split in ("train", "trainval")
    samples: list[Sample] = [
        (str(base / "images" / path), mapping[labels[key]])
        for key, path in paths.items()
        if is_train.get(key, False) == want_train
    ]
    check_samples(source.name, samples, base / "images.txt", base / "images", _hint(source.name, source.root))
    return ImageList(samples, transform)


def _torchvision_root(source: Source) -> Path:
    inner = _INNER[source.name]
    if not (source.root / inner).is_dir() and source.root.name == inner:
        return source.root.parent
    return source.root


def _load_flowers(source: Source, split: str, transform: Transform) -> Dataset:
    root = _torchvision_root(source)
    if split == "trainval":
        parts = [_load_flowers(source, part, transform) for part in ("train", "val")]
        return ConcatDataset(parts)
    if not (root / "flowers-102" / "setid.mat").is_file() and not source.download:
        raise not_found(source.name, _looked(source, ["flowers-102/setid.mat"]), _hint(source.name, root))
    try:
        return Flowers102(str(root), split=split, transform=transform, download=source.download)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise DataError(
            f"could not read flowers102 from {root / 'flowers-102'}: {err}", hint=_hint(source.name, root)
        ) from None


def _load_cars(source: Source, split: str, transform: Transform) -> Dataset:
    root = _torchvision_root(source)
    if not (root / "stanford_cars" / "devkit").is_dir():
        raise not_found(source.name, _looked(source, ["stanford_cars/devkit"]), _hint(source.name, root))
    official = "train" if split in ("train", "trainval") else "test"
    try:
        return StanfordCars(str(root), split=official, transform=transform)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise DataError(
            f"could not read stanford_cars from {root / 'stanford_cars'}: {err}", hint=_hint(source.name, root)
        ) from None


def _load_dogs(source: Source, split: str, transform: Transform) -> Dataset:
    from scipy.io import loadmat

    listing = source.root / ("train_list.mat" if split in ("train", "trainval") else "test_list.mat")
    if not listing.is_file():
        raise not_found(source.name, _looked(source, [listing.name]), _hint(source.name, source.root))
    try:
        mat = loadmat(str(listing), squeeze_me=True)
        files = [str(f) for f in np.atleast_1d(mat["file_list"])]
        labels = [int(v) for v in np.atleast_1d(mat["labels"])]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read {listing}: {err}", hint=_hint(source.name, source.root)) from None
    mapping = _one_based(source.name, listing, set(labels))
    samples = [(str(source.root / "Images" / f), mapping[v]) for f, v in zip(files, labels, strict=True)]
    check_samples(source.name, samples, listing, source.root / "Images", _hint(source.name, source.root))
    return ImageList(samples, transform)


_NATIVE = {
    "cub": _load_cub_style,
    "nabirds": _load_cub_style,
    "flowers102": _load_flowers,
    "stanford_cars": _load_cars,
    "stanford_dogs": _load_dogs,
}

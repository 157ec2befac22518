"""scikit-learn's bundled handwritten digits: 1,797 real 8×8 grayscale images, 10 classes, no download.

Pixel values 0..16 are scaled to 0..255. A fixed stratified split (seed 0) gives ``train`` 1,437 and
``val`` 360 images; ``test`` = ``val``. ``data.root`` is ignored.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ._common import Source, Transform, bad_split

SPLITS = ("train", "val", "test")
NUM_CLASSES = 10
VAL_SIZE = 360
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=VAL_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return {
        "train": (images[train_idx], labels[train_idx]),
        "val": (images[val_idx], labels[val_idx]),
    }


class Digits(Dataset):
    """8×8 uint8 images as PIL "L" images with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform | None = None) -> None:
        self.images = images
        self.targets = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


def load(source: Source, split: str, transform: Transform) -> Dataset:
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    images, labels = _splits()["train" if split == "train" else "val"]
    return Digits(images, labels, transform)

"""Tasks derived from a dataset by the ``data:`` keys ``classes``, ``task``, ``train_size`` and ``val_size``.

Applied in this order, each split read once from the dataset with no transform (PIL images):

1. ``classes: [c0, c1, ...]`` keeps the images of those classes and relabels ``c_i`` as ``i``;
2. ``task: rotation`` turns each kept image by ``k * 90`` degrees and makes ``k`` its label (4 classes).
   ``k`` is fixed per image of a split (a permutation drawn from ``split_seed``, so each ``k`` is a
   quarter of the split), not re-drawn each epoch;
3. ``train_size: N`` keeps a class-stratified random ``N`` of the training split (drawn from
   ``split_seed``, the same ``N`` whatever ``val_size`` is);
4. ``val_size: M`` (a count, or a fraction of the training images) carves a class-stratified ``val``
   split out of those training images; ``train`` is the rest. ``val`` is then never the dataset's own
   ``val`` or ``test``: this is the split to choose hyper-parameters on.

``test_size: T`` (a count or a fraction) carves a class-stratified ``test`` split out of the training
split before steps 3–4 (drawn from ``split_seed``), for data with no test split of its own (a flat class
folder, a CSV file). Otherwise ``test`` (and ``val`` without ``val_size``) get steps 1–2 only and are always
scored in full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utune.errors import DataError
from utune.spec.sections import DataConfig

ROTATIONS = 4
_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
_SPLIT_SALT = {"train": 1, "val": 2, "test": 3, "trainval": 4, "train800": 5}


def active(cfg: DataConfig) -> bool:
    """Whether any key of this module changes the dataset."""
    return bool(cfg.classes or cfg.task != "classify" or cfg.train_size or cfg.val_size or cfg.test_size)


def base_split(cfg: DataConfig, split: str) -> str:
    """The dataset's split that ``split`` is made from (``val`` and ``test`` come from ``train`` when carved)."""
    carved = (cfg.val_size and split == "val") or (cfg.test_size and split == "test")
    return "train" if carved else split


def derived_classes(cfg: DataConfig, dataset_classes: int) -> int:
    """The class count of the derived task (checking ``classes`` against the dataset's)."""
    if cfg.classes:
        bad = [c for c in cfg.classes if c >= dataset_classes]
        if bad:
            raise DataError(
                f"data.classes names class {bad[0]}, but {cfg.dataset!r} has {dataset_classes} classes",
                hint=f"use class indices 0..{dataset_classes - 1}",
            )
    if cfg.task == "rotation":
        return ROTATIONS
    return len(cfg.classes) if cfg.classes else dataset_classes


class Derived(Dataset):
    """Images ``indices`` of ``base`` (read untransformed), rotated by ``90 * rotations[i]``, labelled
    ``labels[i]``, then ``transform``."""

    def __init__(
        self,
        base: Dataset,
        indices: np.ndarray,
        labels: np.ndarray,
        rotations: np.ndarray | None,
        transform: Callable[[Any], Any],
    ) -> None:
        self.base, self.indices, self.rotations, self.transform = base, indices, rotations, transform
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.base[int(self.indices[index])]
        if self.rotations is not None and self.rotations[index]:
            image = image.transpose(_TURNS[int(self.rotations[index])])  # exact, any shape
        return self.transform(image), self.targets[index]


def targets(ds: Dataset) -> np.ndarray:
    """Every label of ``ds``: its ``targets`` (or torchvision's ``_labels``), else read item by item."""
    found = getattr(ds, "targets", None)
    if found is None:
        found = getattr(ds, "_labels", None)
    if found is None:
        found = [ds[i][1] for i in range(len(ds))]  # type: ignore[arg-type]
    return np.asarray([int(y) for y in found], dtype=np.int64)


def stratified_pick(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``count`` items, each class's share proportional to its frequency (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * count / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: count - int(take.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def _kept(cfg: DataConfig, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: positions of the kept classes and their new labels."""
    if not cfg.classes:
        return np.arange(len(labels)), labels
    remap = {c: i for i, c in enumerate(cfg.classes)}
    keep = np.flatnonzero(np.isin(labels, cfg.classes))
    return keep, np.asarray([remap[int(y)] for y in labels[keep]], dtype=np.int64)


def _rotations(cfg: DataConfig, split: str, n: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.split_seed, _SPLIT_SALT.get(split, 9), 7])
    return rng.permutation(n) % ROTATIONS


def _count(size: int | float, n: int) -> int:
    return size if isinstance(size, int) else round(size * n)


def _carve_test(cfg: DataConfig, labels: np.ndarray) -> np.ndarray:
    """``test_size``: positions of the carved test split (class-stratified, drawn from ``split_seed``)."""
    t = _count(cfg.test_size, len(labels))  # type: ignore[arg-type]
    if not 0 < t < len(labels):
        raise DataError(
            f"data.test_size {cfg.test_size} leaves no training images ({len(labels)} to carve from)",
            hint=f"use a test_size between 1 and {len(labels) - 1} (or a fraction such as 0.2)",
        )
    return stratified_pick(labels, t, np.random.default_rng([cfg.split_seed, 3]))


def _train_part(cfg: DataConfig, split: str, labels: np.ndarray) -> np.ndarray:
    """Steps 3–4: positions (into ``labels``) that make up ``split`` (``train`` or the carved ``val`` or
    ``test``)."""
    positions = np.arange(len(labels))
    if cfg.test_size:
        test = _carve_test(cfg, labels)
        if split == "test":
            return test
        positions = np.setdiff1d(positions, test)
    if cfg.train_size:
        if cfg.train_size > len(positions):
            raise DataError(
                f"data.train_size is {cfg.train_size} but {cfg.dataset!r} has {len(positions)} training images"
                + (" of the chosen classes" if cfg.classes else ""),
                hint=f"use data.train_size <= {len(positions)}",
            )
        picked = stratified_pick(labels[positions], cfg.train_size, np.random.default_rng([cfg.split_seed, 1]))
        positions = positions[picked]
    if not cfg.val_size:
        return positions
    m = cfg.val_size if isinstance(cfg.val_size, int) else round(cfg.val_size * len(positions))
    if not 0 < m < len(positions):
        raise DataError(
            f"data.val_size {cfg.val_size} leaves no training images ({len(positions)} to carve from)",
            hint=f"use a val_size between 1 and {len(positions) - 1} (or a fraction such as 0.2)",
        )
    val = positions[stratified_pick(labels[positions], m, np.random.default_rng([cfg.split_seed, 2]))]
    return val if split == "val" else np.setdiff1d(positions, val)


def derive(cfg: DataConfig, split: str, base: Dataset, transform: Callable[[Any], Any]) -> Derived:
    """``split`` of the derived task, made from ``base`` (the dataset's :func:`base_split`, untransformed)."""
    source = base_split(cfg, split)
    keep, labels = _kept(cfg, targets(base))
    rotations = None
    if cfg.task == "rotation":
        rotations = _rotations(cfg, source, len(keep))
        labels = rotations
    if source == "train" and (cfg.train_size or cfg.val_size or cfg.test_size):
        part = _train_part(cfg, split, labels)
        keep, labels = keep[part], labels[part]
        rotations = rotations[part] if rotations is not None else None
    if len(keep) == 0:
        raise DataError(f"split {split!r} of {cfg.dataset!r} has no images of data.classes {cfg.classes}")
    return Derived(base, keep, labels, rotations, transform)

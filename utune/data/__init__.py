"""Datasets and data loaders for training: ``data:`` section → ``{split: Dataset}`` → ``DataLoader``.

Every split yields ``(image, label)``: a normalised float tensor ``(C, S, S)`` shaped like the model's
input (``C`` from the model's ``input_size``; ``S`` from ``data.img_size`` or the model) and an ``int``
label in ``0..num_classes-1``. Transforms come from the model's timm data config; see
:mod:`utune.data.datasets.transforms` (light timm training augmentation, resize + centre crop for
evaluation; grayscale images are repeated to the model's channel count).

Where data lives: ``data.root`` when set, else ``<base>/<dataset>`` with ``<base>`` =
``$UTUNE_DATA`` or ``~/.cache/utune/data`` (VTAB tasks share ``<base>/vtab-1k``). Nothing is
downloaded unless ``build_datasets(..., download=True)``, and only CIFAR, Fashion-MNIST and
Flowers-102 (official layout) can be downloaded. A dataset that is not there raises one
:class:`~utune.errors.DataError` naming the paths looked at and how to get it.

==================  =========================================================  ======================
``data.dataset``    layout under the root                                      splits
==================  =========================================================  ======================
cifar100, cifar10   ``cifar-100-python/`` / ``cifar-10-batches-py/`` (official  train, test,
                    python archives, extracted)                                val = test
cub, nabirds,       VPT: ``{train,val,test}.json`` (relative path → label)      train, val, test,
flowers102,         next to the images (``images/`` for cub and nabirds,       trainval
stanford_cars,      ``Images/`` for stanford_dogs); else the official layout
stanford_dogs       (see :mod:`~utune.data.datasets.fgvc`)
vtab-<task>         ``<task>/{train800val200,train800,val200,test}.txt`` with   train (= 800+200),
                    ``relative/path.jpg label`` lines (NOAH/SSF vtab-1k)       train800, val, test
imagefolder         ``train/<class>/*``, ``val/<class>/*`` [, ``test/<class>/*``]  train, val, test
digits              none: scikit-learn's bundled 8×8 digits (1,437 / 360)      train, val, test = val
fashion-mnist       ``FashionMNIST/raw/*-ubyte[.gz]``, the files in the root,    train, test,
                    or Debian's ``/usr/share/datasets/fashion-mnist/``         val = test
==================  =========================================================  ======================

Each family's module under :mod:`utune.data.datasets` documents its layout in full.

Tasks derived from any of them (:mod:`utune.data.derive`): ``data.classes`` (a class subset, relabelled),
``data.task: rotation`` (predict the 0/90/180/270-degree turn of an image), ``data.train_size`` (a
stratified training subset, e.g. VTAB-1k's 1,000) and ``data.val_size`` (a validation split carved from
the training data, for choosing hyper-parameters without the test split).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utune._signals import ignore_sigint_in_worker
from utune.config import DataConfig
from utune.data import derive
from utune.data.datasets._common import Source, data_base, resolve_root
from utune.data.datasets.registry import ENTRIES, TRAIN_SPLITS, Entry, lookup, names
from utune.data.datasets.transforms import InputNorm, build_transform
from utune.errors import DataError, UtuneWarning

__all__ = [
    "InputNorm",
    "OpenedData",
    "build_datasets",
    "build_loader",
    "data_base",
    "dataset_names",
    "default_workers",
    "dataset_root",
    "num_classes",
    "open_datasets",
]


def dataset_names() -> list[str]:
    """Every accepted ``data.dataset`` value (the 19 VTAB tasks spelled out)."""
    return names()


def dataset_root(cfg: DataConfig) -> Path:
    """The folder the dataset is read from: ``data.root`` or its default under the data base."""
    return resolve_root(cfg.root, lookup(cfg.dataset).default_dir)


def _source(cfg: DataConfig, entry: Entry, download: bool) -> Source:
    root = resolve_root(cfg.root, entry.default_dir)
    return Source(name=entry.name, root=root, explicit=bool(cfg.root), download=download)


def num_classes(cfg: DataConfig) -> int:
    """The number of classes of the task ``cfg`` describes (read from disk for VTAB and imagefolder;
    ``data.classes`` and ``data.task`` change it)."""
    entry = lookup(cfg.dataset)
    count = entry.classes(_source(cfg, entry, download=False))
    return derive.derived_classes(cfg, count) if derive.active(cfg) else count


class DeferredTransform:
    """A transform set after the dataset is opened: data is checked before the model (whose data config
    the transform needs) is built. Picklable, so DataLoader workers get it under any start method."""

    def __init__(self) -> None:
        self.fn: Callable[[Any], Any] | None = None

    def __call__(self, image: Any) -> Any:
        if self.fn is None:
            raise RuntimeError("utune: a dataset was read before its transform was set (OpenedData.attach)")
        return self.fn(image)


@dataclass
class OpenedData:
    """Datasets found and opened (files checked), waiting for the model's transform."""

    cfg: DataConfig
    entry: Entry
    datasets: dict[str, Dataset]
    transforms: dict[str, DeferredTransform]
    classes: int

    def attach(
        self, data_config: Mapping[str, Any], *, augment_training: bool = True, device_normalize: bool = False
    ) -> dict[str, Dataset]:
        """Set each split's transform for the model; ``augment_training=False``: evaluation transform for all.
        ``device_normalize``: the splits yield uint8 pixels, for :class:`InputNorm` on the training device."""
        for split, deferred in self.transforms.items():
            training = augment_training and split in TRAIN_SPLITS and self.cfg.augment != "none"
            deferred.fn = build_transform(
                data_config,
                self.cfg.img_size,
                training=training,
                augment=self.entry.augment,
                mode=self.cfg.augment,
                device_normalize=device_normalize,
            )
        return self.datasets


def open_datasets(cfg: DataConfig, *, splits: Iterable[str] = ("train", "val"), download: bool = False) -> OpenedData:
    """Find and open ``splits`` of ``cfg.dataset`` (one DataError naming the problem when they are not
    there, damaged or unknown); their transforms are set later with :meth:`OpenedData.attach`."""
    entry = lookup(cfg.dataset)
    if download and not entry.downloadable:
        raise DataError(
            f"utune cannot download {entry.name!r}",
            hint="--download works for "
            + ", ".join(e.name for e in ENTRIES.values() if e.downloadable)
            + f"; get {entry.name} by hand (the error without --download says where it goes)",
        )
    source = _source(cfg, entry, download)
    wanted = list(dict.fromkeys(splits))
    unknown = [split for split in wanted if split not in entry.splits]
    if unknown:
        raise DataError(
            f"dataset {entry.name!r} has no split {unknown[0]!r}", hint=f"use one of: {', '.join(entry.splits)}"
        )
    transforms = {split: DeferredTransform() for split in wanted}
    if not derive.active(cfg):
        datasets = {split: entry.load(source, split, transforms[split]) for split in wanted}
        return OpenedData(cfg, entry, datasets, transforms, entry.classes(source))
    classes = derive.derived_classes(cfg, entry.classes(source))  # checked before any image is read
    bases: dict[str, Dataset] = {}
    for split in wanted:
        name = derive.base_split(cfg, split)
        if name not in bases:
            bases[name] = entry.load(source, name, None)  # type: ignore[arg-type]
    datasets = {s: derive.derive(cfg, s, bases[derive.base_split(cfg, s)], transforms[s]) for s in wanted}
    return OpenedData(cfg, entry, datasets, transforms, classes)


def build_datasets(
    cfg: DataConfig,
    data_config: Mapping[str, Any],
    *,
    splits: Iterable[str] = ("train", "val"),
    download: bool = False,
    augment_training: bool = True,
    device_normalize: bool = False,
) -> dict[str, Dataset]:
    """``{split: Dataset}`` for ``cfg.dataset``, transformed for the model described by ``data_config``.

    ``data_config`` is the model's resolved timm data config (``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``); ``cfg.img_size`` overrides its size. Training splits (``train``,
    ``trainval``, ``train800``) get training augmentation unless ``augment_training`` is False (evaluation).
    ``download`` lets CIFAR, Fashion-MNIST and Flowers-102 fetch missing files from their official sources.
    ``device_normalize``: uint8 images instead, normalised on the device by ``InputNorm.from_data_config``.
    """
    opened = open_datasets(cfg, splits=splits, download=download)
    return opened.attach(data_config, augment_training=augment_training, device_normalize=device_normalize)


MAX_WORKERS = 16  # 16 x ~700 img/s (ViT-B's 224 px training transform) ~ 11,000 img/s: more hold memory


def default_workers(requested: int | None = None) -> int:
    """``data.num_workers``: ``requested`` when given (at most the CPU cores this process may use: more
    warn and are capped); else the CPU cores this process may use (its
    affinity), shared among the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), less
    one for the training loop itself, between 0 and :data:`MAX_WORKERS` (one core: load in-process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if requested is not None:
        # each worker is a copy of the process (~0.5 GB with a ViT's transforms): more workers than cores
        # only add memory, and 1000 of them exhaust it (the OOM killer takes the trainer, workers linger)
        if requested > max(cores, 1):
            warnings.warn(
                f"data.num_workers={requested} is more than the {cores} CPU core(s) this process may use: "
                f"capped at {cores}",
                UtuneWarning,
                stacklevel=2,
            )
            return max(cores, 1)
        return requested
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_WORKERS, cores // local - 1))


def _seed_worker(worker_id: int) -> None:
    """Seed numpy in each worker from the worker's torch seed (torch and ``random`` are seeded already);
    workers ignore Ctrl-C, which the main process handles (it reaches the whole process group)."""
    np.random.seed(torch.initial_seed() % 2**32)
    ignore_sigint_in_worker(worker_id)


def build_loader(
    ds: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int | None,
    seed: int,
    distributed: bool,
) -> DataLoader:
    """A DataLoader: shuffled with a seeded generator and ``drop_last`` for training, in order otherwise.

    With ``distributed`` the data is sharded by a :class:`DistributedSampler` (needs an initialised
    process group; call ``loader.sampler.set_epoch(epoch)`` each epoch to reshuffle; evaluation shards
    are padded to equal length by repeating samples). ``drop_last`` is skipped when it would leave no
    batch at all (a dataset smaller than one batch). Workers persist across epochs when
    ``num_workers > 0``; ``num_workers=None`` takes :func:`default_workers`.
    """
    num_workers = default_workers(num_workers)
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}", hint="set train.batch_size >= 1")
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=train) if distributed else None
    per_rank = len(sampler) if sampler is not None else len(ds)  # type: ignore[arg-type]
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train and per_rank >= batch_size,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
    )

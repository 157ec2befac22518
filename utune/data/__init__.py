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
                    or flat ``<class>/*`` (val, test carved: ``val_size``)     (docs/data.md)
csv                 a ``path,label[,split]`` file (``data.root``), paths        train, val, test
                    relative to it; labels are names or integers
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utune._signals import ignore_sigint_in_worker
from utune.data import derive
from utune.data.datasets import _images as images
from utune.data.datasets._common import Source, data_base, resolve_root
from utune.data.datasets.registry import ENTRIES, TRAIN_SPLITS, Entry, lookup, names
from utune.data.datasets.transforms import InputNorm, build_transform
from utune.errors import DataError, UtuneWarning
from utune.spec.sections import DataConfig

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
    "scored_split",
    "available_splits",
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
    class_names: list[str] | None = None  # the names of the classes 0..classes-1, when the dataset has them
    warnings: list[str] = field(default_factory=list)  # e.g. the unreadable images left out

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
    there, damaged or unknown); their transforms are set later with :meth:`OpenedData.attach`.

    Image files are checked first (:func:`~utune.data.datasets._images.check_images`): unreadable ones
    stop here with their names, or are left out with one warning when ``data.skip_bad_images``."""
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
    if derive.active(cfg):  # data.classes checked before any image is read
        derive.derived_classes(cfg, entry.classes(source))
    bases: dict[str, Dataset] = {}
    for split in wanted:
        name = derive.base_split(cfg, split) if derive.active(cfg) else split
        if name not in bases:
            bases[name] = entry.load(source, name, None if derive.active(cfg) else transforms[split])  # type: ignore[arg-type]
    count = entry.classes(source)
    classes = derive.derived_classes(cfg, count) if derive.active(cfg) else count
    warnings = _check_files(cfg, source, bases)
    names = _class_names(cfg, entry, source, bases, count)
    if not derive.active(cfg):
        return OpenedData(cfg, entry, bases, transforms, classes, names, warnings)
    datasets: dict[str, Dataset] = {
        s: derive.derive(cfg, s, bases[derive.base_split(cfg, s)], transforms[s]) for s in wanted
    }
    return OpenedData(cfg, entry, datasets, transforms, classes, names, warnings)


def _check_files(cfg: DataConfig, source: Source, bases: Mapping[str, Dataset]) -> list[str]:
    """Check the image files of datasets read from files (``samples``); drop bad ones if asked."""
    from utune import _output as out

    listed: list[Any] = [ds for ds in bases.values() if isinstance(getattr(ds, "samples", None), list)]
    paths = list(dict.fromkeys(str(p) for ds in listed for p, _ in ds.samples))
    if not paths:
        return []

    def progress(done: int, total: int) -> None:
        out.note(f"checking images: {done:,} / {total:,}")

    show = progress if len(paths) >= images.PROGRESS_FROM else None
    bad = images.check_images(paths, cache_dir=data_base(), key=str(source.root), progress=show)
    if not bad:
        return []
    if not cfg.skip_bad_images:
        raise images.refuse(bad, str(source.root))
    for ds in listed:
        kept = [s for s in ds.samples if str(s[0]) not in bad]
        ds.samples = kept
        ds.targets = [label for _, label in kept]
        if hasattr(ds, "imgs"):
            ds.imgs = kept
        if not kept:
            raise DataError(f"every image of {source.root} is unreadable", hint="check the files")
    return [images.skipped(bad, str(source.root))]


ROTATION_NAMES = ["0", "90", "180", "270"]  # data.task: rotation (degrees turned)


def _class_names(
    cfg: DataConfig, entry: Entry, source: Source, bases: Mapping[str, Dataset], count: int
) -> list[str] | None:
    """The names of the task's classes: the dataset's (folder names, CSV labels, torchvision's ``classes``),
    then ``data.classes`` and ``data.task`` applied."""
    if cfg.task == "rotation":
        return list(ROTATION_NAMES)
    names = entry.names(source) if entry.names is not None else None
    if names is None:
        found = next((getattr(ds, "classes", None) for ds in bases.values() if hasattr(ds, "classes")), None)
        names = [str(n) for n in found] if isinstance(found, list | tuple) and len(found) == count else None
    if names is None:
        return None
    return [names[c] for c in cfg.classes] if cfg.classes else names


def available_splits(cfg: DataConfig) -> tuple[str, ...]:
    """The splits this task really has: the dataset's own (a folder without ``test/`` has no test split),
    plus ``val``/``test`` carved by ``data.val_size``/``data.test_size``."""
    entry = lookup(cfg.dataset)
    held = set(entry.held(_source(cfg, entry, download=False)))
    held |= {"val"} if cfg.val_size else set()
    held |= {"test"} if cfg.test_size else set()
    return tuple(s for s in entry.splits if s in held)


def scored_split(cfg: DataConfig, requested: str | None) -> tuple[str, str | None]:
    """The split an evaluation scores, and a note when it is not the one a reader would assume.

    ``requested`` None: ``test`` when the task has a test split, else ``val`` (said in the note). A requested
    split the task does not have is a DataError saying which ones it has."""
    held = available_splits(cfg)
    if requested is None:
        if "test" in held:
            return "test", None
        carved = " (carved from the training data by data.val_size)" if cfg.val_size else ""
        return "val", f"{cfg.dataset} has no test split: this is the val split{carved}"
    if requested not in held:
        raise DataError(
            f"dataset {cfg.dataset!r} has no {requested!r} split here (it has: {', '.join(held)})",
            hint="pick one of those with --split, or add a test/ folder or data.test_size (carves a test split)"
            if requested == "test"
            else f"pick one of: {', '.join(held)}",
        )
    return requested, None


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
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(ds, shuffle=train, seed=seed, drop_last=train) if distributed else None
    )
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

"""VTAB-1k in the NOAH/SSF layout: ``vtab-<task>`` for any of the 19 tasks.

Layout: ``<root>/<task>/`` holding ``train800val200.txt``, ``train800.txt``, ``val200.txt`` and
``test.txt``; each line is ``relative/path.jpg label`` (0-based), the path relative to
``<root>/<task>/``. ``<root>`` defaults to ``<data base>/vtab-1k`` and may also name the task folder
itself.

Splits (NOAH's convention): ``train`` = ``train800val200`` (all 1,000 training images, what final
runs train on), ``train800``, ``val`` = ``val200`` (a subset of ``train``: for monitoring, not an
unbiased estimate) and ``test``. VTAB images are only resized to the square input size, for training
too: no crop and no flip (flips would change the label of tasks such as ``dsprites_loc``).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ._common import ImageList, Source, Transform, bad_split, check_samples, not_found, read_list_file

TASKS = {  # task folder → number of classes
    "caltech101": 102,
    "cifar": 100,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
SPLIT_FILES = {
    "train": "train800val200.txt",
    "train800": "train800.txt",
    "val": "val200.txt",
    "test": "test.txt",
}
SPLITS = tuple(SPLIT_FILES)
NOAH_URL = "https://github.com/ZhangYuanhan-AI/NOAH"


def task_of(name: str) -> str:
    return name.removeprefix("vtab-")


def task_dir(root: Path, task: str) -> Path:
    """``<root>/<task>``, or ``root`` itself when it is the task folder."""
    inner = root / task
    if not inner.is_dir() and (root / SPLIT_FILES["test"]).is_file():
        return root
    return inner


def _hint(task: str, root: Path) -> str:
    return (
        f"prepare VTAB-1k as NOAH does ({NOAH_URL}, 'Data Preparation': vtab-1k.zip) so that "
        f"{root / task}/ holds the list files and images, or set data.root to the vtab-1k folder"
    )


def load(source: Source, split: str, transform: Transform) -> Dataset:
    if split not in SPLITS:
        raise bad_split(source.name, split, SPLITS)
    task = task_of(source.name)
    folder = task_dir(source.root, task)
    listing = folder / SPLIT_FILES[split]
    if not listing.is_file():
        raise not_found(source.name, [listing], _hint(task, source.root))
    samples = [(str(folder / path), label) for path, label in read_list_file(listing)]
    check_samples(source.name, samples, listing, folder, _hint(task, source.root))
    return ImageList(samples, transform)


def count_classes(source: Source) -> int:
    """The task's known class count, or more when the list files hold larger labels."""
    task = task_of(source.name)
    folder = task_dir(source.root, task)
    labels = [
        label
        for name in SPLIT_FILES.values()
        if (folder / name).is_file()
        for _, label in read_list_file(folder / name)
    ]
    return max([TASKS[task], *(label + 1 for label in labels)])

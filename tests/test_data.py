"""utune.data: every dataset family read from fabricated files in its real on-disk format.

Nothing here downloads: the CIFAR and Fashion-MNIST files are written in their official binary formats,
the image datasets from generated images, and digits is scikit-learn's bundled copy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import random
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import CIFAR10, CIFAR100

from utune.data import build_datasets, build_loader, dataset_names, dataset_root, num_classes
from utune.data.datasets import fashion_mnist
from utune.errors import DataError, UtuneWarning
from utune.spec.sections import DataConfig

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}
GRAY_CONFIG = {**DATA_CONFIG, "input_size": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default roots under tmp_path, and no real Debian Fashion-MNIST install leaking in."""
    monkeypatch.setenv("UTUNE_DATA", str(tmp_path / "base"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")


def _cfg(dataset: str, root: Path | None = None, img_size: int | None = None) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root) if root else None, img_size=img_size)


def _save_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


# --- CIFAR ----------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_cifar(
    root: Path, cls: type[CIFAR10], per_batch: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[int]]:
    """The official python-pickle layout; torchvision's md5 lists patched to the fabricated files."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n_classes, label_key = (100, "fine_labels") if cls is CIFAR100 else (10, "labels")
    labels: dict[str, list[int]] = {}
    for name, count in per_batch.items():
        batch_labels = [int(v) for v in rng.integers(0, n_classes, count)]
        entry = {"batch_label": name, "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        entry[label_key] = batch_labels
        if cls is CIFAR100:
            entry["coarse_labels"] = [label // 5 for label in batch_labels]
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        labels[name] = batch_labels
    meta_key = cls.meta["key"]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(n_classes)]}))
    is_test = {name for name, _ in cls.test_list}
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in per_batch if n not in is_test])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n in per_batch if n in is_test])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    return labels


def test_cifar100_reads_the_official_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _write_cifar(tmp_path / "c100", CIFAR100, {"train": 6, "test": 4}, monkeypatch)
    ds = build_datasets(_cfg("cifar100", tmp_path / "c100", img_size=48), DATA_CONFIG, splits=("train", "val", "test"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 6, "val": 4, "test": 4}
    image, label = ds["train"][2]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert isinstance(label, int) and label == labels["train"][2]
    assert [ds["val"][i][1] for i in range(4)] == labels["test"]  # val is the test set
    assert num_classes(_cfg("cifar100")) == 100


def test_cifar10_at_the_model_size_and_inner_folder_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    labels = _write_cifar(tmp_path / "c10", CIFAR10, batches, monkeypatch)
    ds = build_datasets(_cfg("cifar10", tmp_path / "c10" / "cifar-10-batches-py"), DATA_CONFIG)
    assert len(ds["train"]) == 10 and len(ds["val"]) == 3
    assert ds["val"][0][0].shape == (3, 32, 32)
    assert [ds["train"][i][1] for i in range(10)] == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])


def test_cifar_missing_names_the_folder_and_the_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_datasets(_cfg("cifar100"), DATA_CONFIG)
    assert str(tmp_path / "base" / "cifar100" / "cifar-100-python") in err.value.message
    assert "cifar-100-python.tar.gz" in (err.value.hint or "")
    assert err.value.exit_code == 2


def test_cifar_failed_download_and_corrupt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: CIFAR10) -> None:
        raise URLError("no network")

    monkeypatch.setattr(CIFAR100, "download", offline)
    with pytest.raises(DataError, match="could not download cifar100"):
        build_datasets(_cfg("cifar100", tmp_path / "c"), DATA_CONFIG, download=True)
    _write_cifar(tmp_path / "c", CIFAR100, {"train": 2, "test": 2}, monkeypatch)
    (tmp_path / "c" / "cifar-100-python" / "train").write_bytes(b"truncated")
    with pytest.raises(DataError, match="MD5 checksum of train differs from the official CIFAR100 files"):
        build_datasets(_cfg("cifar100", tmp_path / "c"), DATA_CONFIG)


# --- digits ---------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_real() -> None:
    ds = build_datasets(_cfg("digits"), DATA_CONFIG, splits=("train", "val", "test"))
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (1437, 360, 360)
    again = build_datasets(_cfg("digits"), DATA_CONFIG, splits=("val",))["val"]
    assert again.targets == ds["val"].targets == ds["test"].targets
    assert sorted(set(ds["val"].targets)) == list(range(10)) and num_classes(_cfg("digits")) == 10
    assert np.bincount(ds["val"].targets).min() >= 35  # stratified: ~36 per class
    image, label = ds["val"][0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    assert image.std() > 0.1 and torch.equal(image[0], image[1])  # a real digit, gray repeated to RGB
    raw = ds["val"].images
    assert raw.dtype == np.uint8 and raw.max() == 255 and raw.min() == 0


def test_channel_count_follows_the_model() -> None:
    assert build_datasets(_cfg("digits"), GRAY_CONFIG, splits=("val",))["val"][0][0].shape == (1, 32, 32)
    four = {**DATA_CONFIG, "input_size": (4, 16, 16), "mean": (0.5,) * 4, "std": (0.5,) * 4}
    image = build_datasets(_cfg("digits"), four, splits=("val",))["val"][0][0]
    assert image.shape == (4, 16, 16) and torch.equal(image[0], image[3])


def test_training_split_is_augmented_and_eval_is_not() -> None:
    ds = build_datasets(_cfg("digits", img_size=24), DATA_CONFIG)
    torch.manual_seed(0)
    train_views = [ds["train"][0][0] for _ in range(4)]
    assert any(not torch.equal(train_views[0], view) for view in train_views[1:])
    assert torch.equal(ds["val"][0][0], ds["val"][0][0])


# --- Fashion-MNIST --------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: big-endian magic (0x08 = uint8, ndim), big-endian dims, then the bytes."""
    payload = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _write_fashion(folder: Path, gz: bool, n_train: int = 5, n_test: int = 3) -> np.ndarray:
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    train_labels = rng.integers(0, 10, n_train)
    for prefix, n, labels in (("train", n_train, train_labels), ("t10k", n_test, rng.integers(0, 10, n_test))):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return train_labels


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    labels = _write_fashion(tmp_path / "fm" / "FashionMNIST" / "raw", gz=False)
    ds = build_datasets(_cfg("fashion-mnist", tmp_path / "fm"), DATA_CONFIG, splits=("train", "val"))
    assert (len(ds["train"]), len(ds["val"])) == (5, 3)
    assert [ds["train"][i][1] for i in range(5)] == labels.tolist()
    image = ds["train"][0][0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])


def test_fashion_mnist_gzipped_files_in_the_root(tmp_path: Path) -> None:
    labels = _write_fashion(tmp_path / "fm", gz=True)
    ds = build_datasets(_cfg("fashion_mnist", tmp_path / "fm"), GRAY_CONFIG, splits=("train",))
    assert [ds["train"][i][1] for i in range(5)] == labels.tolist()
    assert ds["train"][0][0].shape == (1, 32, 32)
    assert (tmp_path / "fm" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_debian_location_when_no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    labels = _write_fashion(debian, gz=True)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    ds = build_datasets(_cfg("fashion-mnist"), DATA_CONFIG, splits=("train", "test"))
    assert [ds["train"][i][1] for i in range(5)] == labels.tolist() and len(ds["test"]) == 3
    assert (tmp_path / "base" / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    with pytest.raises(DataError):  # an explicit root never falls back to the Debian copy
        build_datasets(_cfg("fashion-mnist", tmp_path / "elsewhere"), DATA_CONFIG)


def test_fashion_mnist_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_datasets(_cfg("fashion-mnist"), DATA_CONFIG)
    assert str(tmp_path / "base" / "fashion-mnist" / "FashionMNIST" / "raw") in err.value.message
    assert str(tmp_path / "no-debian") in err.value.message
    assert "apt-get install dataset-fashion-mnist" in (err.value.hint or "")


def test_fashion_mnist_bad_idx_file_is_a_data_error(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0f\x01garbage")
    with pytest.raises(DataError, match="could not read Fashion-MNIST"):
        build_datasets(_cfg("fashion-mnist", tmp_path / "fm"), DATA_CONFIG, splits=("train",))


# --- image folders, VPT FGVC, VTAB ------------------------------------------------------------------------


def test_imagefolder_with_grayscale_images_and_test_fallback(tmp_path: Path) -> None:
    for i, cls in enumerate(("ant", "bee", "cat")):
        for j in range(3):
            _save_image(tmp_path / "f" / "train" / cls / f"{j}.png", 10 * i + j, mode="L" if cls == "bee" else "RGB")
    _save_image(tmp_path / "f" / "val" / "cat" / "0.png", 99)  # val lacks ant and bee
    ds = build_datasets(_cfg("imagefolder", tmp_path / "f", img_size=40), DATA_CONFIG, splits=("train", "val", "test"))
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (9, 1, 1)
    assert ds["val"][0][1] == 2 and ds["train"][3][1] == 1  # one class→index map for every split
    image = ds["train"][3][0]
    assert image.shape == (3, 40, 40) and torch.equal(image[0], image[1])
    assert num_classes(_cfg("imagefolder", tmp_path / "f")) == 3


def test_imagefolder_val_class_missing_from_train(tmp_path: Path) -> None:
    _save_image(tmp_path / "f" / "train" / "ant" / "0.png", 0)
    _save_image(tmp_path / "f" / "train" / "bee" / "0.png", 3)
    _save_image(tmp_path / "f" / "val" / "ant" / "0.png", 1)
    _save_image(tmp_path / "f" / "val" / "wasp" / "0.png", 2)
    with pytest.raises(DataError, match="'wasp'"):
        build_datasets(_cfg("imagefolder", tmp_path / "f"), DATA_CONFIG)
    with pytest.raises(DataError, match=f"not found: looked in {tmp_path / 'g'}"):
        num_classes(_cfg("imagefolder", tmp_path / "g"))


def _vpt_split(root: Path, split: str, entries: dict[str, int]) -> None:
    (root / f"{split}.json").write_text(json.dumps(entries))


def test_cub_vpt_json_layout(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    splits = {"train": range(0, 4), "val": range(4, 6), "test": range(6, 9)}
    for split, ids in splits.items():
        entries = {f"{k % 3 + 1:03d}.Bird_{k % 3}/img_{k}.jpg": k % 3 for k in ids}
        for path in entries:
            _save_image(root / "images" / path, len(path))
        _vpt_split(root, split, entries)
    ds = build_datasets(_cfg("cub", root), DATA_CONFIG, splits=("train", "val", "test", "trainval"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "val": 2, "test": 3, "trainval": 6}
    assert [ds["test"][i][1] for i in range(3)] == [0, 1, 2]
    assert ds["trainval"][5][0].shape == (3, 32, 32)
    assert num_classes(_cfg("cub", root)) == 200


def test_nabirds_vpt_sparse_class_ids_are_remapped(tmp_path: Path) -> None:
    root = tmp_path / "nabirds"
    for split, ids in {"train": (295, 1000), "val": (295,), "test": (1000, 313)}.items():
        entries = {f"{cid:04d}/{split}_{cid}.jpg": cid for cid in ids}
        for path in entries:
            _save_image(root / "images" / path, 0)
        _vpt_split(root, split, entries)
    ds = build_datasets(_cfg("nabirds", root), DATA_CONFIG, splits=("test",))
    assert [ds["test"][i][1] for i in range(2)] == [2, 1]


def test_cub_official_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    base = root / "CUB_200_2011"
    rows = [(1, "001.A/a.jpg", 1, 1), (2, "001.A/b.jpg", 1, 0), (3, "200.Z/c.jpg", 200, 1)]
    for _, path, _, _ in rows:
        _save_image(base / "images" / path, 5)
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    ds = build_datasets(_cfg("cub", root), DATA_CONFIG, splits=("train", "val"))
    assert [label for _, label in ds["train"].samples] == [0, 199] and len(ds["val"]) == 1


def test_stanford_dogs_official_layout(tmp_path: Path) -> None:
    from scipy.io import savemat

    files = ["n02085620-Chihuahua/a.jpg", "n02116738-African_hunting_dog/b.jpg"]
    for name in files:
        _save_image(tmp_path / "dogs" / "Images" / name, 3)
    file_list = np.empty((2, 1), dtype=object)
    file_list[0, 0], file_list[1, 0] = np.array([files[0]]), np.array([files[1]])
    savemat(tmp_path / "dogs" / "train_list.mat", {"file_list": file_list, "labels": np.array([[1], [120]])})
    savemat(tmp_path / "dogs" / "test_list.mat", {"file_list": file_list[1:], "labels": np.array([[120]])})
    ds = build_datasets(_cfg("stanford_dogs", tmp_path / "dogs"), DATA_CONFIG, splits=("train", "test"))
    assert [label for _, label in ds["train"].samples] == [0, 119] and ds["test"][0][1] == 119


def test_vpt_json_pointing_at_missing_images(tmp_path: Path) -> None:
    _vpt_split(tmp_path, "train", {"001.A/gone.jpg": 0})
    with pytest.raises(DataError, match="neither under .*images nor"):
        build_datasets(_cfg("cub", tmp_path), DATA_CONFIG, splits=("train",))


def test_fgvc_missing_names_the_split_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_datasets(_cfg("stanford_dogs"), DATA_CONFIG)
    assert str(tmp_path / "base" / "stanford_dogs" / "train.json") in err.value.message
    assert "vpt" in (err.value.hint or "").lower()


def _write_vtab(task_dir: Path) -> None:
    lists = {"train800.txt": 4, "val200.txt": 2, "test.txt": 3}
    lines: dict[str, list[str]] = {}
    for name, count in lists.items():
        stem = name.removesuffix(".txt")
        lines[name] = [f"images/{stem}/{i}.jpg {i % 3 + (45 if name == 'test.txt' else 0)}" for i in range(count)]
        for i in range(count):
            _save_image(task_dir / "images" / stem / f"{i}.jpg", i, size=(30, 20))
    lines["train800val200.txt"] = lines["train800.txt"] + lines["val200.txt"]
    for name, content in lines.items():
        (task_dir / name).write_text("\n".join(content) + "\n")


def test_vtab_noah_layout(tmp_path: Path) -> None:
    _write_vtab(tmp_path / "vtab-1k" / "dtd")
    cfg = _cfg("vtab-dtd", tmp_path / "vtab-1k")
    ds = build_datasets(cfg, DATA_CONFIG, splits=("train", "train800", "val", "test"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 6, "train800": 4, "val": 2, "test": 3}
    assert [ds["test"][i][1] for i in range(3)] == [45, 46, 47]
    first, again = ds["train"][0][0], ds["train"][0][0]
    assert first.shape == (3, 32, 32) and torch.equal(first, again)  # VTAB: plain resize, no augmentation
    assert num_classes(cfg) == 48  # a label (47) beyond DTD's 47 classes counts
    assert len(build_datasets(_cfg("vtab_dtd", tmp_path / "vtab-1k" / "dtd"), DATA_CONFIG)["val"]) == 2


def test_vtab_missing_and_malformed_lists(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_datasets(_cfg("vtab-eurosat"), DATA_CONFIG)
    assert str(tmp_path / "base" / "vtab-1k" / "eurosat" / "train800val200.txt") in err.value.message
    assert num_classes(_cfg("vtab-eurosat")) == 10
    _write_vtab(tmp_path / "v" / "kitti")
    (tmp_path / "v" / "kitti" / "val200.txt").write_text("images/a.jpg 1\nimages/b.jpg\n")
    with pytest.raises(DataError, match=r"val200\.txt:2"):
        build_datasets(_cfg("vtab-kitti", tmp_path / "v"), DATA_CONFIG)
    (tmp_path / "v" / "kitti" / "images" / "test" / "0.jpg").unlink()
    with pytest.raises(DataError, match="0.jpg listed in .*test.txt does not exist"):
        build_datasets(_cfg("vtab-kitti", tmp_path / "v"), DATA_CONFIG, splits=("test",))


# --- names, classes, splits -----------------------------------------------------------------------------


def test_names_and_class_counts() -> None:
    names = dataset_names()
    assert {"cifar100", "digits", "fashion-mnist", "imagefolder", "vtab-cifar", "vtab-smallnorb_ele"} <= set(names)
    assert sum(name.startswith("vtab-") for name in names) == 19
    expected = {
        "cifar100": 100,
        "cifar10": 10,
        "cub": 200,
        "nabirds": 555,
        "flowers102": 102,
        "stanford_cars": 196,
        "stanford_dogs": 120,
        "digits": 10,
        "fashion-mnist": 10,
    }
    assert {name: num_classes(_cfg(name)) for name in expected} == expected


def test_unknown_names_and_splits() -> None:
    with pytest.raises(DataError) as err:
        build_datasets(_cfg("cifar1000"), DATA_CONFIG)
    assert "cifar1000" in err.value.message and "cifar100" in (err.value.hint or "")
    with pytest.raises(DataError, match="unknown dataset 'vtab-eurosta'") as err:
        num_classes(_cfg("vtab-eurosta"))
    assert "vtab-eurosat" in (err.value.hint or "")
    with pytest.raises(DataError, match="no dataset set"):
        num_classes(DataConfig())
    with pytest.raises(DataError, match="no split 'holdout'") as err:
        build_datasets(_cfg("digits"), DATA_CONFIG, splits=("holdout",))
    assert "train" in (err.value.hint or "")


def test_dataset_root_default_and_override(tmp_path: Path) -> None:
    assert dataset_root(_cfg("vtab-dtd")) == tmp_path / "base" / "vtab-1k"
    assert dataset_root(_cfg("cub", tmp_path / "x")) == tmp_path / "x"


# --- loaders ----------------------------------------------------------------------------------------------


def test_build_loader_batches_and_seeded_order() -> None:
    ds = build_datasets(_cfg("digits", img_size=16), DATA_CONFIG)
    train = build_loader(ds["train"], 100, train=True, num_workers=0, seed=3, distributed=False)
    assert len(train) == 1437 // 100
    images, labels = next(iter(train))
    assert images.shape == (100, 3, 16, 16) and labels.dtype == torch.int64
    order = [labels.tolist() for _, labels in build_loader(ds["val"], 64, True, 0, seed=3, distributed=False)]
    same = [labels.tolist() for _, labels in build_loader(ds["val"], 64, True, 0, seed=3, distributed=False)]
    assert order == same and len(order) == 360 // 64
    val = build_loader(ds["val"], 100, train=False, num_workers=0, seed=0, distributed=False)
    assert [len(labels) for _, labels in val] == [100, 100, 100, 60]
    tiny = build_loader(ds["val"], 500, train=True, num_workers=0, seed=0, distributed=False)
    assert [len(labels) for _, labels in tiny] == [360]  # drop_last never leaves zero batches


def test_build_loader_distributed_and_workers(tmp_path: Path) -> None:
    ds = build_datasets(_cfg("digits", img_size=8), DATA_CONFIG, splits=("val",))["val"]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = build_loader(ds, 50, train=True, num_workers=1, seed=0, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.persistent_workers
        loader.sampler.set_epoch(1)
        assert [len(labels) for _, labels in loader] == [50] * 7
    finally:
        torch.distributed.destroy_process_group()


def test_num_workers_default_comes_from_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from utune.data import MAX_WORKERS, default_workers

    assert DataConfig(dataset="digits").num_workers is None  # the spec default: derived
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert default_workers(3) == 3 and default_workers(0) == 0  # an explicit count is kept
    with pytest.warns(UtuneWarning, match="data.num_workers=1000 is more than the 8 CPU core"):
        assert default_workers(1000) == 8  # up to the cores: each worker is a copy of the process
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, workers in ((1, 0), (2, 1), (8, 7), (64, MAX_WORKERS)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_workers(None) == workers
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this machine: 4 cores each
    assert default_workers(None) == 3
    ds = build_datasets(_cfg("digits", img_size=8), DATA_CONFIG, splits=("val",))["val"]
    assert build_loader(ds, 50, train=False, num_workers=None, seed=0, distributed=False).num_workers == 3


def test_augment_false_gives_the_training_split_the_eval_transform() -> None:
    data_config = {
        "input_size": (3, 32, 32),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    plain = build_datasets(DataConfig(dataset="digits", augment=False), data_config, splits=("train", "val"))
    first = [plain["train"][0][0] for _ in range(2)]
    assert torch.equal(first[0], first[1])  # deterministic: no random crop or flip
    augmented = build_datasets(DataConfig(dataset="digits"), data_config, splits=("train",))
    assert augmented["train"][0][0].shape == first[0].shape


# --- normalisation on the device ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "timm", "crop-flip"])
@pytest.mark.parametrize("config", [DATA_CONFIG, GRAY_CONFIG, {**DATA_CONFIG, "mean": (0.485, 0.456, 0.406)}])
def test_device_normalize_gives_the_cpu_paths_batch(mode: str, config: dict) -> None:
    """uint8 pixels + InputNorm on a batch == the CPU transform's normalised floats (the same RNG draws)."""
    from utune.data import InputNorm

    cfg = DataConfig(dataset="digits", augment=mode, img_size=24)
    cpu = build_datasets(cfg, config, splits=("train",))["train"]
    raw = build_datasets(cfg, config, splits=("train",), device_normalize=True)["train"]
    norm = InputNorm.from_data_config(config)
    for i in range(8):
        torch.manual_seed(i), random.seed(i)
        want = cpu[i][0]
        torch.manual_seed(i), random.seed(i)
        pixels = raw[i][0]
        assert pixels.dtype == torch.uint8 and pixels.shape == want.shape  # 1 byte a value instead of 4
        got = norm(pixels[None])[0]
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    batch = next(iter(build_loader(raw, 16, train=False, num_workers=0, seed=0, distributed=False)))[0]
    assert batch.dtype == torch.uint8 and norm(norm(batch)).dtype == torch.float32  # float batches pass as they are


def test_device_normalize_keeps_the_cpu_path_for_steps_that_need_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.transforms import Compose, RandomErasing

    from utune.data.datasets import transforms

    real = transforms.create_transform
    monkeypatch.setattr(transforms, "create_transform", lambda **kw: Compose([*real(**kw).transforms, RandomErasing()]))
    image = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    out = transforms.build_transform(DATA_CONFIG, None, training=True, device_normalize=True)(image)
    assert out.dtype == torch.float32  # normalised on the CPU; InputNorm passes it unchanged

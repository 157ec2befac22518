"""Derived tasks (data.classes, task: rotation, train_size, val_size) and the augment modes, on real digits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from utune.data import build_datasets, num_classes, open_datasets
from utune.data.datasets.transforms import build_transform
from utune.errors import DataError, SpecError
from utune.spec import load_spec, spec_json_schema
from utune.spec.sections import DataConfig

DC = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}


def _opened(**keys: object) -> dict:
    return open_datasets(DataConfig(dataset="digits", **keys), splits=("train", "val", "test")).datasets


def test_classes_keep_and_relabel_in_the_order_given() -> None:
    plain, sub = _opened(), _opened(classes=[7, 3])
    assert num_classes(DataConfig(dataset="digits", classes=[7, 3])) == 2
    assert set(sub["test"].targets) == {0, 1}
    assert Counter(sub["test"].targets) == {0: plain["test"].targets.count(7), 1: plain["test"].targets.count(3)}
    for i in (0, 1, 50):
        _, label = sub["train"].base[int(sub["train"].indices[i])]
        assert [7, 3][sub["train"].targets[i]] == label
    assert len(sub["train"]) == plain["train"].targets.count(7) + plain["train"].targets.count(3)


def test_train_size_and_val_size_carve_stratified_disjoint_splits_from_train() -> None:
    whole = _opened(train_size=500)
    carved = _opened(train_size=500, val_size=100)
    train, val = set(carved["train"].indices), set(carved["val"].indices)
    assert (len(train), len(val)) == (400, 100) and not train & val
    assert train | val == set(whole["train"].indices)  # the same 500 whatever val_size is
    assert len(carved["test"]) == 360 and carved["test"].base is not carved["train"].base  # test is digits' own
    assert max(Counter(carved["val"].targets).values()) - min(Counter(carved["val"].targets).values()) <= 1
    assert len(_opened(val_size=0.25)["val"]) == round(0.25 * 1437)
    other = _opened(train_size=500, split_seed=1)
    assert set(other["train"].indices) != set(whole["train"].indices)


def test_rotation_task_labels_are_the_turns_applied() -> None:
    opened = open_datasets(DataConfig(dataset="digits", task="rotation", train_size=400), splits=("train", "test"))
    assert opened.classes == 4 and len(opened.datasets["train"]) == 400
    ds = opened.datasets["test"]
    assert Counter(ds.targets) == {k: 90 for k in range(4)}  # a quarter of the 360 each
    opened.attach(DC, augment_training=False)
    for i in range(8):
        raw = np.asarray(ds.base[int(ds.indices[i])][0], dtype=np.float32)
        image, k = ds[i]
        expected = (np.rot90(raw, k) / 255.0 - 0.5) / 0.5
        assert np.allclose(image[0].numpy(), expected, atol=1e-6), (i, k)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"classes": [3, 12]}, "class 12"),
        ({"train_size": 5000}, "1437 training images"),
        ({"val_size": 1437}, "leaves no training images"),
    ],
)
def test_bad_sizes_and_classes_are_data_errors(keys: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        open_datasets(DataConfig(dataset="digits", **keys), splits=("train", "val"))


def test_spec_checks_the_new_keys_with_lines(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "version: 1\nmodel: {name: test_vit}\ndata:\n  dataset: digits\n  classes: [1, 1]\n"
        "  train_size: 100\n  val_size: 1.5\n  augment: sideways\n  task: jigsaw\n"
    )
    with pytest.raises(SpecError) as e:
        load_spec(path)
    text = "\n".join(e.value.problems)
    for needle in (
        "s.yaml:5: data.classes",
        "distinct",
        "s.yaml:7: data.val_size",
        "s.yaml:8: data.augment",
        "s.yaml:9",
    ):
        assert needle in text, text
    with pytest.raises(SpecError, match="must be smaller than train_size"):
        load_spec(path, ["data.classes=null", "data.val_size=100", "data.augment=none", "data.task=classify"])
    assert load_spec(path, ["data.classes=[1,2]", "data.val_size=0.2", "data.augment=crop", "data.task=rotation"])
    schema = json.dumps(spec_json_schema()["$defs"]["DataConfig"])
    for key in ("classes", "train_size", "val_size", "split_seed", "rotation", "crop-flip"):
        assert key in schema


def test_augment_booleans_keep_their_meaning() -> None:
    assert DataConfig(augment=True).augment == "timm" and DataConfig(augment=False).augment == "none"


def test_crop_modes_shift_the_image_and_crop_flip_also_mirrors() -> None:
    from PIL import Image

    image = build_datasets(DataConfig(dataset="digits", augment="none"), DC, splits=("train",))["train"]
    raw = image.images[image.targets.index(7)]  # a 7: no shift of it is its mirror image

    pil = Image.fromarray(raw)
    plain = build_transform(DC, None, training=False)(pil)
    torch.manual_seed(0)
    crops = [build_transform(DC, None, training=True, mode="crop")(pil) for _ in range(20)]
    assert all(c.shape == plain.shape for c in crops) and any(not torch.equal(c, plain) for c in crops)
    assert all(build_transform(DC, None, training=True, mode="none")(pil).equal(plain) for _ in range(3))
    # crop-flip: some draws are mirror images of a crop (pad 1 px of 8: every crop is a shift by -1..1)
    shifts = {
        (dx, dy): torch.roll(plain, (dy, dx), dims=(1, 2)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)
    }  # roll differs from a zero-padded shift only at the border: compare the inner 6x6
    flips = [build_transform(DC, None, training=True, mode="crop-flip")(pil) for _ in range(30)]
    inner = (slice(None), slice(2, 6), slice(2, 6))
    mirrored = [f for f in flips if not any(torch.equal(f[inner], s[inner]) for s in shifts.values())]
    assert mirrored and len(mirrored) < len(flips)

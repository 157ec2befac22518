"""A user's own images, typed as a person types the commands: a subprocess from an empty folder.

Real files the test writes with PIL (JPEG and PNG, a truncated JPEG, a zero-byte PNG, a PNG whose header
claims 400 megapixels, an empty class folder, a CSV file), one tiny training run (timm's `test_vit` at
32 px) shared by the tests, then eval, export and predict on it. Predictions are checked against the
tuned model's argmax computed here in Python, for a run, a tuner file and a merged timm folder.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.test_cli_user import SCRIPT, _wait_for, env_for, ok, utune

CLASSES = ("cat", "dog", "owl")
SPEC = """\
version: 1
model: {name: test_vit, img_size: 32}
tuners:
  - {name: lora, kind: lora, at: "blocks.*.attn.qkv", rank: 4}
trainable: [head]
data: {dataset: csv, root: labels.csv, val_size: 0.25, test_size: 0.25, skip_bad_images: true, augment: none,
       num_workers: 0}
train: {epochs: 1, max_steps: 3, batch_size: 8, log_every: 1, lr: 0.01}
"""


def write_photos(root: Path, per_class: int = 8) -> list[Path]:
    """Real JPEG and PNG files, a colour per class plus noise."""
    rng = np.random.default_rng(0)
    paths = []
    for c, name in enumerate(CLASSES):
        for j in range(per_class):
            pixels = np.clip(70 * c + 30 + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{j}.{'jpg' if j % 2 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bomb_png(path: Path) -> None:
    """A PNG whose header says 20000 x 20000 pixels (over PIL's limit): PIL refuses it on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/<class>/*.jpg|png, a truncated JPEG among them, labels.csv listing all, one trained run."""
    d = tmp_path_factory.mktemp("yours")
    paths = write_photos(d / "photos")
    broken = d / "photos" / "dog" / "broken.jpg"
    shutil.copy(d / "photos" / "dog" / "1.jpg", broken)
    truncate(broken)
    lines = ["path,label"] + [f"{p.relative_to(d).as_posix()},{p.parent.name}" for p in [*paths, broken]]
    (d / "labels.csv").write_text("\n".join(lines) + "\n")
    (d / "spec.yaml").write_text(SPEC)
    r = ok(utune("apply", "spec.yaml", "--train", cwd=d))
    assert "skipped 1 unreadable image" in r.err and "broken.jpg" in r.err, r.err
    return d


def the_run(work: Path) -> Path:
    (run,) = sorted((work / "runs").glob("spec-*"))
    return run


def test_a_csv_run_records_its_class_names(work: Path) -> None:
    spec = (the_run(work) / "spec.yaml").read_text()
    assert "class_names:\n  - cat\n  - dog\n  - owl\n" in spec


def test_a_bad_image_stops_training_before_it_starts_naming_the_file(work: Path) -> None:
    r = utune("apply", "spec.yaml", "--train", "data.skip_bad_images=false", "--format", "json", cwd=work)
    assert r.code == 2 and "Traceback" not in r.err
    doc = json.loads(r.out)  # --format json: the error is one JSON document on stdout too
    assert doc["exit_code"] == 2 and "broken.jpg" in doc["error"] and "truncated" in doc["error"].lower()
    assert "skip_bad_images" in doc["hint"]
    assert len(list((work / "runs").glob("spec-*"))) == 1  # no half-started run left behind


def test_eval_scores_the_carved_test_split_with_top5_per_class_and_a_confusion_picture(work: Path) -> None:
    doc = ok(utune("eval", "--format", "json", "-o", "confusion.png", cwd=work)).json()
    assert doc["split"] == "test" and doc["note"] is None and doc["n"] == 6  # 25 % of 24 readable images
    assert 0 <= doc["acc"] <= doc["top5"] == 1.0  # three classes: every label is in the top five
    assert [c["name"] for c in doc["per_class"]] == list(CLASSES) and sum(c["n"] for c in doc["per_class"]) == 6
    assert np.asarray(doc["confusion"]).shape == (3, 3) and np.asarray(doc["confusion"]).sum() == 6
    with Image.open(work / "confusion.png") as picture:
        assert picture.format == "PNG" and picture.width > 300
    table = ok(utune("eval", "--split", "val", cwd=work)).out
    assert "val accuracy: top-1" in table and "top-5" in table and "owl" in table


def test_a_flat_folder_without_a_test_split_is_scored_as_val_and_a_zero_byte_png_is_named(
    work: Path, tmp_path: Path
) -> None:
    shutil.copytree(work / "photos", tmp_path / "flat", ignore=shutil.ignore_patterns("broken.jpg"))
    (tmp_path / "flat" / "cat" / "empty.png").write_bytes(b"")
    run = str(the_run(work).resolve())
    args = ["eval", run, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "flat"), "data.test_size=null"]
    r = utune(*args, "data.skip_bad_images=false", cwd=tmp_path)
    assert r.code == 2 and "empty.png" in r.err and "0 bytes" in r.err and "Traceback" not in r.err
    doc = ok(utune(*args, "--format", "json", cwd=tmp_path)).json()
    assert doc["split"] == "val" and "no test split" in doc["note"]  # never called "test" when it is val
    assert doc["warnings"] and "empty.png" in doc["warnings"][0]
    r = utune(*args, "--split", "test", cwd=tmp_path)
    assert r.code == 2 and "no 'test' split" in r.err


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("empty_class", "class folder without images: "),
        ("one_class", "only one class folder ('cat')"),
        ("flat_no_val", "data.val_size"),
    ],
)
def test_layouts_a_model_cannot_learn_from_are_refused_by_name(layout: str, expected: str, tmp_path: Path) -> None:
    write_photos(tmp_path / "data", per_class=2)
    if layout == "empty_class":
        (tmp_path / "data" / "emu").mkdir()
    if layout == "one_class":
        for name in ("dog", "owl"):
            shutil.rmtree(tmp_path / "data" / name)
    val = "" if layout == "flat_no_val" else ", val_size: 0.5"
    spec = SPEC.replace("dataset: csv, root: labels.csv, val_size: 0.25, test_size: 0.25, skip_bad_images: true,",
                        f"dataset: imagefolder, root: data{val},")  # fmt: skip
    (tmp_path / "spec.yaml").write_text(spec)
    r = utune("apply", "spec.yaml", "--train", cwd=tmp_path)
    assert r.code == 2 and expected in r.err and "Traceback" not in r.err, r.err
    if layout == "empty_class":
        assert str(tmp_path / "data" / "emu") in r.err
    assert not (tmp_path / "runs").exists()


def test_exports_carry_the_class_names(work: Path) -> None:
    run = str(the_run(work))
    ok(utune("export", run, "--merge", "--folder", "-o", "merged", cwd=work))
    ok(utune("export", run, "--tuners-only", "-o", "tuners.safetensors", cwd=work))
    ok(utune("export", run, "--peft", "-o", "peft", cwd=work))
    config = json.loads((work / "merged" / "config.json").read_text())
    assert config["pretrained_cfg"]["label_names"] == list(CLASSES) and config["num_classes"] == 3
    import timm

    model = timm.create_model(f"local-dir:{work / 'merged'}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == list(CLASSES)
    with safe_open(str(work / "tuners.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["utune.class_names"]) == list(CLASSES)
    assert json.loads((work / "peft" / "class_names.json").read_text()) == list(CLASSES)


def _python_argmax(model: torch.nn.Module, transform: object, paths: list[Path]) -> list[int]:
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])  # type: ignore[operator]
        return model.eval()(x).argmax(-1).tolist()


def test_predict_agrees_with_the_models_argmax_for_a_run_a_tuner_file_and_a_merged_folder(work: Path) -> None:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    import utune as api
    from utune.data.datasets.transforms import build_transform
    from utune.export.tuners_only import load_tuners
    from utune.runs import restore_run

    if not (work / "merged").is_dir():
        test_exports_carry_the_class_names(work)
    images = sorted(p for p in (work / "photos").rglob("*") if p.is_file() and p.name != "broken.jpg")
    run = the_run(work)
    built = restore_run(run)
    expected = _python_argmax(built.model, build_transform(built.data_config, 32, training=False), images)
    assert len(set(expected)) > 1  # a test that could fail: not one constant answer
    tuned = api.build(run / "spec.yaml")
    load_tuners(tuned, work / "tuners.safetensors")
    from_file = _python_argmax(tuned.model, build_transform(tuned.data_config, 32, training=False), images)
    plain = timm.create_model(f"local-dir:{work / 'merged'}", pretrained=True)
    merged = _python_argmax(plain, create_transform(**resolve_model_data_config(plain)), images)
    assert from_file == expected and merged == expected
    ok(utune("export", str(run), "--tuners-only", "--folder", "-o", "tuner_folder", cwd=work))
    sources = [[str(run)], ["tuners.safetensors", "--spec", str(run / "spec.yaml")], ["merged"], ["tuner_folder"]]
    for source in sources:
        doc = ok(utune("predict", *source, "photos", "--skip-bad-images", "--format", "json", cwd=work)).json()
        got = [p["top"][0]["index"] for p in doc["predictions"] if "broken" not in p["path"]]
        assert got == expected, source
        assert [p["top"][0]["label"] for p in doc["predictions"]][:1] == [CLASSES[expected[0]]]
        assert all(abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in doc["predictions"])  # 3 classes, k=5
    # the library call underneath, a glob, the CSV and the table formats
    doc = api.predict(run, [str(work / "photos" / "owl" / "*.png")], top_k=1)
    assert [p["top"][0]["index"] for p in doc["predictions"]] == [
        e for p, e in zip(images, expected, strict=True) if p.parent.name == "owl" and p.suffix == ".png"
    ]
    lines = ok(utune("predict", "merged", "photos/cat/0.png", "photos/owl", "-k", "2", "-f", "csv", cwd=work)).out
    rows = lines.strip().splitlines()
    assert (
        rows[0] == "path,label_1,prob_1,label_2,prob_2" and rows[1].startswith("photos/cat/0.png,") and len(rows) == 10
    )
    table = ok(utune("predict", str(run), "photos/dog/0.png", cwd=work)).out
    assert "photos/dog/0.png" in table and CLASSES[expected[images.index(work / "photos/dog/0.png")]] in table


def test_predict_names_unreadable_images_or_skips_them(work: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(work / "photos" / "cat" / "0.png", tmp_path / "in" / "good.png")
    bomb_png(tmp_path / "in" / "bomb.png")
    (tmp_path / "in" / "zero.png").write_bytes(b"")
    run = str(the_run(work).resolve())
    r = utune("predict", run, "in", "--format", "json", cwd=tmp_path)
    assert r.code == 2 and "Traceback" not in r.err
    error = json.loads(r.out)["error"]
    assert "2 unreadable images" in error and "bomb.png" in error and "pixel limit" in error and "zero.png" in error
    doc = ok(utune("predict", run, "in", "--skip-bad-images", "--format", "json", cwd=tmp_path)).json()
    assert [p["path"] for p in doc["predictions"]] == ["in/good.png"] and len(doc["skipped"]) == 2
    r = utune("predict", "nowhere", "in", "--format", "json", cwd=tmp_path)
    assert r.code == 2 and json.loads(r.out)["hint"].startswith("pass a run folder")


def test_a_truncated_file_found_in_a_dataloader_worker_is_one_line_naming_it(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from utune.data.datasets._common import ImageList
    from utune.data.datasets._images import UnreadableImageError

    (path,) = [p for p in write_photos(tmp_path, per_class=2) if p.suffix == ".jpg"][:1]
    truncate(path)  # after any check: the file goes bad while training
    loader = DataLoader(ImageList([(str(path), 0)], transform=lambda im: torch.zeros(1)), num_workers=1)
    with pytest.raises(UnreadableImageError) as err:
        next(iter(loader))
    assert err.value.message.startswith(f"cannot read image {path}: ") and "\n" not in err.value.message
    assert err.value.exit_code == 2


def test_the_image_check_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    from utune.data.datasets import _images

    paths = [str(p) for p in write_photos(tmp_path / "p", per_class=2)]
    assert _images.check_images(paths, cache_dir=tmp_path, key="k") == {}
    truncate(Path(paths[1]))  # changes size and mtime: checked again
    assert list(_images.check_images(paths, cache_dir=tmp_path, key="k")) == [paths[1]]
    calls = []
    original = _images.problem
    _images.problem = lambda p: calls.append(p) or original(p)  # type: ignore[assignment]
    try:
        assert list(_images.check_images(paths, cache_dir=tmp_path, key="k")) == [paths[1]]
    finally:
        _images.problem = original  # type: ignore[assignment]
    assert calls == []  # nothing opened again


def test_json_errors_for_every_kind_of_failure(tmp_path: Path) -> None:
    for args in (["eval", "nowhere", "-f", "json"], ["eval", "--bogus", "--format", "json"]):
        r = utune(*args, cwd=tmp_path)
        doc = json.loads(r.out)
        assert r.code == doc["exit_code"] == 2 and doc["error"] and "hint" in doc and "error:" in r.err.lower()


def test_compare_statistics_state_n_and_t_and_agreeing_seeds_raise_no_warning() -> None:
    from utune.compare.stats import welch
    from utune.compare.summary import ci_note

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert welch([0.3, 0.3, 0.3], [0.3, 0.3, 0.30000000000000004]) == 1.0
        assert welch([0.25, 0.25], [0.5, 0.5000000001]) == 0.0
        p = welch([0.5, 0.5, 0.6], [0.4, 0.45, 0.5])
    from scipy.stats import ttest_ind

    assert p == pytest.approx(ttest_ind([0.5, 0.5, 0.6], [0.4, 0.45, 0.5], equal_var=False).pvalue)
    assert ci_note([{"acc": [0.1, 0.2]}, {"acc": [0.1, 0.2]}]).endswith("(n = 2: t = 12.706)")


def test_the_resume_hint_repeats_the_overrides_and_pasting_it_resumes(tmp_path: Path) -> None:
    from tests.test_cli_user import SPEC as DIGITS

    (tmp_path / "spec.yaml").write_text(DIGITS)
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [__import__("sys").executable, "-m", "utune"]
    args = ["train.max_steps=40", "train.epochs=20", "train.log_every=1"]
    proc = subprocess.Popen(
        [*cmd, "apply", "spec.yaml", *args, "--train", "--out", "run"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(proc, "step 3/")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    hint = " ".join(err.split()).split("resume with `")[1].split("`")[0]
    assert hint == "utune apply spec.yaml " + " ".join(args) + " --train --out run --resume"
    r = ok(utune(*hint.split()[1:], "--format", "json", cwd=tmp_path))
    assert r.json()["summary"]["step"] == 40  # type: ignore[index]


def test_the_confusion_picture_stays_readable_at_100_classes(tmp_path: Path) -> None:
    from utune.export.draw import confusion_png

    counts = (np.eye(100, dtype=int) * 30 + 1).tolist()
    confusion_png(counts, [f"class_{i}" for i in range(100)], tmp_path / "c.png", title="100 classes")
    with Image.open(tmp_path / "c.png") as picture:
        assert min(picture.size) > 3000  # ~37 px per class: every name printed at a legible size


def test_csv_labels_as_integers_with_a_split_column_and_its_mistakes(tmp_path: Path) -> None:
    from utune.data import available_splits, open_datasets
    from utune.errors import DataError
    from utune.spec.sections import DataConfig

    paths = write_photos(tmp_path / "img", per_class=4)
    rows = [f"{p.relative_to(tmp_path).as_posix()},{CLASSES.index(p.parent.name)},{'val' if i % 4 == 0 else 'train'}"
            for i, p in enumerate(paths)]  # fmt: skip
    (tmp_path / "a.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(dataset="csv", root=str(tmp_path / "a.csv"))
    opened = open_datasets(cfg, splits=("train", "val"))
    assert opened.class_names == ["0", "1", "2"] and opened.classes == 3
    assert (len(opened.datasets["train"]), len(opened.datasets["val"])) == (9, 3)
    assert available_splits(cfg) == ("train", "val")
    bad = {
        "path,label\nimg/cat/0.png,0\nimg/dog/0.png,2\n": "class 1 has no image",
        "file,label\nimg/cat/0.png,cat\n": "must name the columns path and label",
        "path,label\nimg/cat/0.png,cat\nimg/nope.png,dog\n": "img/nope.png (line 3)",
        "path,label\nimg/cat/0.png,cat\nimg/cat/1.jpg,cat\n": "a classifier needs two or more classes",
        "path,label,split\nimg/cat/0.png,cat,train\nimg/dog/0.png,dog,holdout\n": "a.csv:3: unknown split 'holdout'",
    }
    for text, message in bad.items():
        (tmp_path / "a.csv").write_text(text)
        with pytest.raises(DataError, match=re.escape(message)):
            open_datasets(cfg, splits=("train",))


def test_a_flat_folder_carves_stratified_val_and_test(tmp_path: Path) -> None:
    from utune.data import open_datasets, scored_split
    from utune.spec.sections import DataConfig

    write_photos(tmp_path / "flat", per_class=10)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "flat"), val_size=0.2, test_size=0.3)
    opened = open_datasets(cfg, splits=("train", "val", "test"))
    sizes = {s: len(d) for s, d in opened.datasets.items()}
    assert sizes == {"train": 17, "val": 4, "test": 9}  # test first: 30 % of 30; val: 20 % of the other 21
    assert sorted(opened.datasets["test"].targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified by class
    assert scored_split(cfg, None) == ("test", None)

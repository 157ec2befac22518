"""End to end through the CLI: `utune apply --train` on CIFAR-format data and on digits, then `utune eval`."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR100

from utune.cli import main


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_learnable_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch, classes: int = 5) -> None:
    """CIFAR-100's real pickle layout with a learnable signal: class k brightens a band of rows."""
    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", 400), ("test", 100)):
        labels = rng.integers(0, classes, count)
        images = rng.integers(0, 120, (count, 3, 32, 32)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, k % 3, 6 * k : 6 * k + 6, :] = 250
        entry = {
            "data": images.reshape(count, 3072),
            "fine_labels": [int(v) for v in labels],
            "coarse_labels": [int(v) // 5 for v in labels],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    return out.out


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "acc" not in x], [x for x in lines if "acc" in x]


SPEC = """\
version: 1
model: {{name: test_resnet, num_classes: {classes}, img_size: 32}}
trainable: ["**"]
data: {{dataset: {dataset}, num_workers: 0}}
train: {{epochs: {epochs}, batch_size: 32, lr: 0.003, warmup_epochs: 0.5, log_every: 2, seed: 0}}
"""


@pytest.mark.parametrize(
    ("dataset", "classes", "chance", "epochs"), [("cifar100", 100, 0.2, 3), ("digits", 10, 0.1, 2)]
)
def test_apply_train_then_eval(
    dataset: str,
    classes: int,
    chance: float,
    epochs: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("UTUNE_QUIET", "1")
    monkeypatch.setenv("UTUNE_DATA", str(tmp_path / "data"))
    if dataset == "cifar100":
        write_learnable_cifar100(tmp_path / "data" / "cifar100", monkeypatch)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(classes=classes, dataset=dataset, epochs=epochs))
    run = tmp_path / "run"
    run_cli(["apply", str(spec), "--train", "--out", str(run)], capsys)

    train_lines, evals = read_metrics(run)
    assert all({"step", "loss"} <= set(x) for x in train_lines) and all({"step", "acc"} <= set(x) for x in evals)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    final = evals[-1]["acc"]
    assert final > chance + 0.1, f"accuracy {final} is not above chance {chance}"
    assert (run / "spec.yaml").is_file() and list((run / "checkpoints").glob("step-*/model.safetensors"))
    summary = json.loads((run / "summary.json").read_text())

    out = run_cli(["eval", str(run), "--split", "val", "--format", "json"], capsys)
    result = json.loads(out)
    assert result["acc"] == pytest.approx(summary["final_val_acc"], abs=1e-9) and result["acc"] == final

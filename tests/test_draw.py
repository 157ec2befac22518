"""Pictures: the structure drawing (from the manifest) on five families, and training curves of two runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pytest

from tests.archs import model_section
from utune.cli import main
from utune.engine.build import build
from utune.export.draw import draw_structure, plot_runs, rows_of
from utune.runs import train_run

RULES: dict[str, list[dict[str, Any]]] = {
    "vit": [{"name": "mha", "kind": "adapter", "at": "blocks.*.attn", "tap": "parent.input"},
            {"name": "qv", "kind": "lora", "at": {"path": "blocks.*.attn.qkv", "layers": "0"}, "rank": 2}],
    "swin": [{"name": "lo", "kind": "lora", "at": "layers.*.blocks.*.attn.qkv", "rank": 2}],
    "convnext": [{"name": "ad", "kind": "adapter", "at": "stages.*.blocks.*"}],
    "resnet": [{"name": "ssf", "kind": "ssf", "at": {"type": "BatchNorm2d"}}],
    "tv_resnet": [{"name": "side", "kind": "bypass", "at": "layer*"}],
}  # fmt: skip


def colours(path: Path) -> int:
    image = mpimg.imread(str(path))[..., :3]
    return len(np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0))


@pytest.mark.parametrize("arch", sorted(RULES))
def test_structure_drawings(arch: str, tmp_path: Path) -> None:
    built = build({"version": 1, "model": model_section(arch), "tuners": RULES[arch], "trainable": []})
    rows = rows_of(built)
    assert rows and all(row.blocks for row in rows)
    png = draw_structure(built, tmp_path / "s.png")
    assert png.stat().st_size > 5_000 and colours(png) >= 4  # chips in the rules' colours, text, frame
    svg = draw_structure(built, tmp_path / "s.svg").read_text()
    assert all(rule["name"] in svg for rule in RULES[arch])  # text stays text


def test_a_vit_with_tuners_in_one_block_shows_the_frozen_rest() -> None:
    built = build({"version": 1, "model": model_section("vit"), "tuners": RULES["vit"][1:], "trainable": []})
    labels = [row.label for row in rows_of(built)]
    assert labels[0] == "blocks.0" and labels[1].startswith("blocks.1-") and len(labels) == 2


def test_utune_draw_and_plot_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "version: 1\nmodel: {name: test_vit, num_classes: 10, img_size: 32}\n"
        "tuners:\n  - {name: lo, kind: lora, at: 'blocks.*.attn.qkv', rank: 2}\ntrainable: [head]\n"
        "data: {dataset: digits, augment: false, num_workers: 0}\n"
        "train: {epochs: 1, max_steps: 4, batch_size: 32, log_every: 1, eval_every: 2}\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["draw", str(spec), "-o", str(tmp_path / "d.svg")])
    assert e.value.code == 0 and "lo" in (tmp_path / "d.svg").read_text()
    runs = []
    for lr in ("0.01", "0.001"):
        built = build(str(spec), [f"train.lr={lr}"])
        runs.append(Path(train_run(built, tmp_path / f"run-{lr}", resume=False)["out_dir"]))
    png = plot_runs(runs, tmp_path / "curves.png")
    assert png.stat().st_size > 10_000 and colours(png) >= 6
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path), "-o", str(tmp_path / "c.png")])  # not a run folder: exit 2
    assert e.value.code == 2 and "no metrics.jsonl records" in capsys.readouterr().err

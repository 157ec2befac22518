"""`make quickstart`: the driver end to end in its --smoke mode, the shipped backbone and the quickstart specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "quickstart"
WEIGHTS = QS / "vit_fmnist6.safetensors"
METHOD_SPECS = sorted((QS / "methods").glob("*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pretrain_model() -> dict:
    """The pre-training spec's model section, with the Fashion-MNIST classes it trained on."""
    spec = yaml.safe_load((QS / "pretrain.yaml").read_text())
    return {**spec["model"], "classes": spec["data"]["classes"]}


def test_shipped_backbone_loads_strictly():
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from utune.models import create_model

    assert WEIGHTS.stat().st_size <= 5 * 2**20
    m = _pretrain_model()
    state = load_file(str(WEIGHTS))
    model = create_model(m["name"], pretrained=False, num_classes=m["num_classes"], kwargs=m["kwargs"])
    model.load_state_dict(state, strict=True)  # every key and shape of the plain timm model, nothing else
    # and through utune's own loader, as `model.pretrained: quickstart/vit_fmnist6.safetensors` does: a
    # 10-class head (digits) cannot take the 6-class one, so the loader keeps the fresh head and all the rest
    loaded = create_model(m["name"], pretrained=WEIGHTS, num_classes=10, kwargs=m["kwargs"])
    for k, v in loaded.state_dict().items():
        assert k.startswith("head.") or torch.equal(v, state[k].to(v.dtype)), k
    assert not state["head.weight"].any() and not state["head.bias"].any()  # a fresh (zero) head ships
    assert state["blocks.0.attn.qkv.weight"].std() > 0.01  # the backbone does not
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_kwargs"]) == m["kwargs"]
    assert 0.9 <= float(meta["fmnist_test_acc"]) <= 1.0  # on its own six classes (the bar: 90 %)
    assert json.loads(meta["fmnist_classes"]) == m["classes"] == [0, 1, 3, 5, 7, 8]


@pytest.mark.parametrize("spec", METHOD_SPECS, ids=lambda p: p.stem)
def test_method_specs_tune_the_shipped_backbone(spec):
    import utune

    s = utune.load_spec(spec)
    m = _pretrain_model()
    assert s.model.pretrained == str(WEIGHTS.resolve())  # written relative to the spec file, stored absolute
    assert (s.model.name, dict(s.model.kwargs), s.model.num_classes) == (m["name"], m["kwargs"], 10)
    assert s.data.augment == "none"
    assert s.data.dataset == "digits"


def test_method_specs_cover_the_comparison():
    names = {p.stem for p in METHOD_SPECS}
    assert {"linear", "full", "utuning", "lora"} <= names
    utuning = yaml.safe_load((QS / "methods" / "utuning.yaml").read_text())["tuners"]
    assert [(r["kind"], r["placement"]) for r in utuning] == [("adapter", "parallel")] * 2


def test_quickstart_smoke(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "UTUNE_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, str(QS / "run.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trainable params" in proc.stdout and "U-Tuning" in proc.stdout  # the table
    res = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in res["methods"]}
    assert set(rows) == {"utuning", "lora"}
    for r in rows.values():
        assert 0.0 <= r["test_acc"] <= 1.0 and r["test_n"] == 360
        assert 0 < r["trainable_params"] < r["total_params"]
        assert (out / r["key"] / "summary.json").is_file()
    assert {len(r["sites"]) for r in rows["utuning"]["tuners"]} == {6}
    md = (out / "results.md").read_text()
    assert "| U-Tuning (dual P-Adapter) |" in md and "| LoRA (q, v) |" in md
    for png in ("accuracy_vs_params.png", "structure.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
    exports = {e["what"]: e for e in res["exports"]}
    merged = exports["LoRA merged into plain ViT weights"]
    assert Path(merged["path"]).is_file()
    assert merged["plain_model_test_acc"] == pytest.approx(merged["tuned_test_acc"], abs=1 / 360 + 1e-9)
    assert Path(exports["U-Tuning tuners only"]["path"]).is_file()

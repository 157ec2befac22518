"""Hub-ready export folders: timm loads the merged one from the local folder as it is; the model card parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from utune.engine.build import build
from utune.export import load_tuners
from utune.export.hub import export_folder

SPEC = {
    "version": 1,
    "model": {"name": "test_vit", "num_classes": 5, "img_size": 32},
    "tuners": [{"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4}],
    "trainable": ["head"],
}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained() -> object:
    built = build(SPEC)
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return built


def test_a_merged_folder_loads_in_timm_from_the_local_folder(tmp_path: Path) -> None:
    built = trained()
    result = export_folder(built, "merge", tmp_path / "hub")
    assert result["files"] == ["README.md", "config.json", "model.safetensors", "utune_spec.yaml"]
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["model_args"]["img_size"] == 32
    plain = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    with torch.no_grad():
        tuned, got = built.model.eval()(X), plain(X)
    assert float((tuned - got).abs().max()) <= 1e-5 * float(tuned.abs().max())
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard.load(str(tmp_path / "hub" / "README.md"))
    assert card.data.library_name == "timm" and "utune" in card.data.tags
    assert "`lo` | `lora`" in card.text and "Trainable parameters" in card.text


def test_a_tuner_folder_loads_back(tmp_path: Path) -> None:
    built = trained()
    export_folder(built, "tuners-only", tmp_path / "t")
    fresh = build(str(tmp_path / "t" / "utune_spec.yaml"))
    load_tuners(fresh, tmp_path / "t" / "tuners.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(X), built.model.eval()(X))

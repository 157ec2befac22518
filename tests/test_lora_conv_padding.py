"""LoRA on convolutions that are not plain nn.Conv2d calls: timm's TF-"same" padded convs (padding computed
per input, so LoRA's A must pad the same way) merge exactly; weight-standardised convs (NFNet, BiT) train with
LoRA but refuse to merge, since the forward pass would standardise the added weight too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from utune.engine.build import build
from utune.errors import ExportError
from utune.export import export_merged

CONVS = {"path": "**", "type": "Conv2d"}


def spec(name: str, size: int) -> dict:
    return {"version": 1, "model": {"name": name, "pretrained": False, "num_classes": 3, "img_size": size},
            "tuners": [{"name": "lora", "kind": "lora", "at": CONVS, "rank": 2}], "trainable": []}  # fmt: skip


def train(built, size: int) -> None:
    model = built.model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 3, size, size, generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()


def test_lora_on_tf_same_padded_convs_lines_up_and_merges(tmp_path: Path) -> None:
    built = build(spec("tf_mobilenetv3_small_minimal_100", 33), verify=True)  # odd size: asymmetric "same" pads
    sames = [m for m in built.base.modules() if type(m).__name__ == "Conv2dSame"]
    assert sames and built.report["identity_max_abs_diff"] == 0.0
    train(built, 33)
    result = export_merged(built, tmp_path / "merged.safetensors")
    assert result["verify"].ok, result["verify"].line()


def test_lora_on_weight_standardised_convs_refuses_to_merge(tmp_path: Path) -> None:
    built = build(spec("test_nfnet", 32), verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    train(built, 32)
    with pytest.raises(ExportError, match="standardises its weight"):
        export_merged(built, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()

"""``utune export --format peft``: Hugging Face PEFT loads the folder onto a plain timm model and computes
what the utune model computes (LoRA on Linear and Conv2d, per-layer ranks, a trained head)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from utune.api import build
from utune.errors import ExportError
from utune.export import export_peft
from utune.export.merge import forward_eval

peft = pytest.importorskip("peft")

K = 5
KWARGS = {"img_size": 32, "depth": 3}


def test_peft_loads_the_exported_lora(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, **KWARGS).state_dict(), base)
    spec = {
        "version": 1,
        "model": {"name": "vit_tiny_patch16_224", "num_classes": K, "img_size": 32, "kwargs": KWARGS,
                  "pretrained": str(base)},
        "tuners": [
            {"name": "qkv", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4, "alpha": 8},
            {"name": "fc1", "kind": "lora", "at": "blocks.*.mlp.fc1", "rank": 2, "alpha": 3},  # rank/alpha patterns
            {"name": "embed", "kind": "lora", "at": "patch_embed.proj", "rank": 2},  # Conv2d LoRA
        ],
        "trainable": ["head"],
    }  # fmt: skip
    built = build(spec)
    model = built.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, *built.input_size, generator=gen)
        loss = F.cross_entropy(model(x), torch.randint(0, K, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()

    folder = tmp_path / "peft"
    result = export_peft(built, folder)
    assert result["verify"] is not None and result["verify"].ok
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    assert config["r"] == 2 and set(config["rank_pattern"].values()) == {4}  # most layers have rank 2, qkv 4

    # a fresh timm model with the pretrained weights (an untrained head): PEFT brings LoRA and the head
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, **KWARGS)
    plain.load_state_dict(load_file(str(base)))
    loaded = peft.PeftModel.from_pretrained(plain, str(folder))
    x = torch.randn(3, *built.input_size, generator=torch.Generator().manual_seed(7))
    tuned, got = forward_eval(built.model, x), forward_eval(loaded, x)
    assert torch.allclose(tuned, got, atol=1e-5), float((tuned - got).abs().max())

    with pytest.raises(ExportError, match="already exists"):
        export_peft(built, folder)


def test_sliced_qkv_lora_is_refused_with_the_reason(tmp_path: Path) -> None:
    built = build(
        {
            "version": 1,
            "model": {"name": "vit_tiny_patch16_224", "num_classes": K, "img_size": 32, "kwargs": KWARGS},
            "tuners": [{"name": "qv", "kind": "lora", "at": "blocks.0.attn.qkv", "slices": ["q", "v"]}],
        }
    )
    with pytest.raises(ExportError, match=r"qv \(lora\).*slices") as e:
        export_peft(built, tmp_path / "peft")
    assert e.value.exit_code == 2 and not (tmp_path / "peft").exists()

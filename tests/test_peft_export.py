"""``utune export --format peft``: Hugging Face PEFT loads the folder onto a plain timm model and computes
what the utune model computes (LoRA on Linear and Conv2d, q/v-sliced LoRA on a fused qkv, per-layer ranks, a
trained head)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from utune.engine.build import build
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


def base_weights(path: Path) -> Path:
    """Random "pretrained" weights in a file, so utune and the plain timm model share the base."""
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, **KWARGS).state_dict(), path)
    return path


def train(built: Any, steps: int = 3) -> None:
    """A few AdamW steps on random data, so every LoRA B is away from its zero init."""
    model = built.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, *built.input_size, generator=gen)
        loss = F.cross_entropy(model(x), torch.randint(0, K, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_sliced_qkv_lora_exports_as_one_lora_on_the_fused_layer(tmp_path: Path) -> None:
    base = base_weights(tmp_path / "base.safetensors")
    built = build(
        {
            "version": 1,
            "model": {"name": "vit_tiny_patch16_224", "num_classes": K, "img_size": 32, "kwargs": KWARGS,
                      "pretrained": str(base)},
            "tuners": [
                {"name": "qv", "kind": "lora", "at": "blocks.*.attn.qkv", "slices": ["q", "v"], "rank": 2,
                 "alpha": 3},
                {"name": "fc1", "kind": "lora", "at": "blocks.*.mlp.fc1", "rank": 2, "alpha": 3},
                {"name": "fc2", "kind": "lora", "at": "blocks.*.mlp.fc2", "rank": 2, "alpha": 3},
            ],
            "trainable": ["head"],
        }
    )  # fmt: skip
    train(built)
    folder = tmp_path / "peft"
    result = export_peft(built, folder)
    assert result["verify"] is not None and result["verify"].ok, result["verify"].line()
    config = json.loads((folder / "adapter_config.json").read_text())
    # rank 2 x 2 slices = 4 on each qkv; alpha 1.5 x 4 = 6 keeps utune's scaling alpha / r = 1.5
    assert (config["r"], config["lora_alpha"]) == (2, 3)
    assert set(config["rank_pattern"].values()) == {4} and set(config["alpha_pattern"].values()) == {6}

    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, **KWARGS)
    plain.load_state_dict(load_file(str(base)))
    loaded = peft.PeftModel.from_pretrained(plain, str(folder))
    x = torch.randn(3, *built.input_size, generator=torch.Generator().manual_seed(7))
    tuned, got = forward_eval(built.model, x), forward_eval(loaded, x)
    assert float((tuned - got).abs().max()) <= 1e-5 * float(tuned.abs().max())

    for i in range(KWARGS["depth"]):
        delta = loaded.base_model.model.blocks[i].attn.qkv.get_delta_weight("default")
        c = delta.shape[1]
        assert torch.count_nonzero(delta[c : 2 * c]) == 0  # the k third stays exactly frozen
        ours = built.model.get_submodule(f"utune.qv.blocks_{i}_attn_qkv").delta_weight().detach()
        assert torch.count_nonzero(ours[c : 2 * c]) == 0 and ours.abs().max() > 0
        assert torch.allclose(delta, ours, atol=1e-6 * float(ours.abs().max()))


@pytest.mark.parametrize(("slices", "ranks"), [(["v"], {"v": 3}), (["q", "k", "v"], {"q": 1, "k": 2, "v": 3})])
def test_slices_of_any_rank_stack_into_one_peft_lora(slices: list[str], ranks: dict[str, int]) -> None:
    from torch import nn

    from utune.export.peft_format import _peft_lora
    from utune.tuners.lora import Lora, LoraBranch, LoraOptions

    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    m = Lora(base, LoraOptions(rank=2, alpha=5, slices=slices))
    for s in slices:  # slices of their own ranks, B away from zero
        m.branches[s] = LoraBranch(base, ranks[s], 8)
        nn.init.normal_(m.branches[s].lora_B.weight)
    a, b, alpha = _peft_lora(m)
    r = sum(ranks.values())
    assert tuple(a.shape) == (r, 8) and tuple(b.shape) == (24, r)
    assert torch.allclose(alpha / r * (b @ a), m.delta_weight(), atol=1e-6)

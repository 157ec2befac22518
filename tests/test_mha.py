"""torchvision's ViT attention (``nn.MultiheadAttention``, a packed ``in_proj_weight``) traced through: the graph
computes what torch computes, LoRA on it equals Hugging Face PEFT's MHA LoRA on the same tensors, and merges
fold into ``in_proj_weight`` (the contract matrix covers LoRA with q/v slices, IA3, prefix and prompts on it)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.archs import model_section
from utune.engine.build import Built, build
from utune.errors import ExportError
from utune.export.merge import forward_eval, merged_state_dict, plain_model
from utune.graph.trace import trace
from utune.models import create_model

MHA = "encoder.layers.encoder_layer_{}.self_attention"


@functools.cache
def _model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("torchvision:vit_b_16", num_classes=5, kwargs={"image_size": 32})
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision's head starts at zero: every output would be 0
    return model


def test_traced_attention_is_torchs_training_path_op_for_op() -> None:
    model = _model()
    gm = trace(model, "vit_b_16")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train(), gm.train()
        assert torch.equal(gm(x), model(x))  # F.multi_head_attention_forward's ops, in its order: bit-exact
        model.eval(), gm.eval()
        eager, traced = model(x), gm(x)  # eager eval runs torch's fused MHA kernel instead: float rounding
    assert float(eager.abs().max()) > 1
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
    model.train()


def _lora_spec(**extra: Any) -> dict[str, Any]:
    rules = [
        {"name": "qkv", "kind": "lora", "at": f"{MHA.format('*')}.in_proj", "rank": 4, "alpha": 8, **extra},
        {"name": "out", "kind": "lora", "at": f"{MHA.format('*')}.out_proj", "rank": 4, "alpha": 8},
    ]
    return {"version": 1, "model": model_section("tv_vit", num_classes=5), "tuners": rules, "trainable": ["heads"]}


def _randomise_b(built: Built) -> None:
    """Non-zero LoRA B (it starts at zero) and head (torchvision's starts at zero: every output would be 0)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if "lora_B" in name or name.startswith("heads."):
                p.normal_(0, 0.05, generator=gen)


def test_lora_on_the_packed_projection_equals_peft_on_the_same_tensors() -> None:
    """PEFT's MHA LoRA (target: the MultiheadAttention) is a LoRA on in_proj_weight and one on out_proj. Its
    out_proj delta is applied twice in PEFT 0.21 (huggingface/peft#3774, open), so the referee compares the
    packed in_proj path, the one utune adds here, with both out_proj B at zero (utune's LoRA on out_proj is its
    plain Linear LoRA, refereed against PEFT in test_peft_export)."""
    peft = pytest.importorskip("peft")
    built = build(_lora_spec())
    _randomise_b(built)
    plain = plain_model(built)
    plain.load_state_dict(built.base.state_dict(), strict=True)
    wrapped = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["self_attention"]))
    params = dict(wrapped.named_parameters())
    with torch.no_grad():
        for i in range(12):
            site = MHA.format(i).replace(".", "_")
            built.model.get_submodule(f"utune.out.{site}_out_proj").branch.lora_B.weight.zero_()
            branch = built.model.get_submodule(f"utune.qkv.{site}_in_proj").branch
            for ab in ("A", "B"):  # PEFT's lora_A (r, E), lora_B (3E, r): the same shapes as utune's
                params[f"base_model.model.{MHA.format(i)}.lora_{ab}.default.weight"].copy_(
                    getattr(branch, f"lora_{ab}").weight
                )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tuned, referee = forward_eval(built.model, x), forward_eval(wrapped, x)
    assert float((tuned - forward_eval(built.base, x)).abs().max()) > 1e-2  # the LoRA changes the output
    diff, scale = float((tuned - referee).abs().max()), float(tuned.abs().max())
    assert diff <= 1e-5 * scale, f"utune vs PEFT on nn.MultiheadAttention: {diff:.3g} (output scale {scale:.3g})"


def test_merge_folds_into_in_proj_weight_and_loads_into_the_plain_model() -> None:
    built = build(_lora_spec(slices=["q", "v"]))
    _randomise_b(built)
    result = merged_state_dict(built)
    assert ("qkv", "lora", f"{MHA.format(0)}.in_proj", f"{MHA.format(0)}.in_proj") in result.folds
    key = f"{MHA.format(0)}.in_proj_weight"
    delta = result.state[key] - built.base.state_dict()[key]
    c = 768
    assert delta[:c].abs().sum() > 0 and torch.count_nonzero(delta[c : 2 * c]) == 0 and delta[2 * c :].abs().sum() > 0
    plain = plain_model(built)
    plain.load_state_dict(result.state, strict=True)  # keyed like torchvision's model: no in_proj.weight
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tuned, merged = forward_eval(built.model, x), forward_eval(plain, x)
    assert float((tuned - merged).abs().max()) <= 1e-4 * float(tuned.abs().max())


def test_peft_export_of_a_lora_on_the_packed_projection_is_refused_with_the_reason(tmp_path: Path) -> None:
    from utune.export.peft_format import export_peft

    built = build(_lora_spec())
    with pytest.raises(ExportError, match="PEFT puts LoRA on a MultiheadAttention as a whole"):
        export_peft(built, tmp_path / "peft")

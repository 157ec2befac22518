"""The LoRA family beyond the contract matrix: weight-changing tuners stacked on one layer fold in graph order,
grouped-conv LoRA's arithmetic, VeRA's shared frozen projections in files, DoRA's frozen k rows, and one clear
error for each thing a user can get wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tests.archs import model_section
from utune.engine.build import Built, build
from utune.errors import ExportError, SelectionError, SpecError
from utune.export import export_merged, export_peft, export_tuners, load_tuners, merged_state_dict
from utune.export.merge import forward_eval, plain_model


def spec(arch: str, *rules: dict[str, Any]) -> dict[str, Any]:
    named = [{"name": f"r{i}", **r} for i, r in enumerate(rules)]
    return {"version": 1, "model": model_section(arch, 5), "tuners": named, "trainable": ["head"]}


def train(built: Built, steps: int = 3, seed: int = 0) -> None:
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, *built.input_size, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def test_weight_tuners_stacked_on_one_layer_fold_in_graph_order(tmp_path: Path) -> None:
    """On every qkv: OFT rotates its input, LoRA and GLoRA add to its output, DoRA rescales it (reading the
    frozen W), SSF scales it; BOFT and VeRA on fc1. The merged plain model computes the same function."""
    qkv, fc1 = "blocks.*.attn.qkv", "blocks.*.mlp.fc1"
    rules = [
        {"kind": "oft", "at": qkv, "block_size": 16},
        {"kind": "lora", "at": qkv, "rank": 2},
        {"kind": "dora", "at": qkv, "rank": 2, "slices": ["q", "v"]},
        {"kind": "glora", "at": qkv, "rank": 2, "d_e": "vector"},
        {"kind": "ssf", "at": qkv},
        {"kind": "boft", "at": fc1, "block_size": 4, "butterfly_factor": 2},
        {"kind": "vera", "at": fc1, "rank": 8},
        {"kind": "loha", "at": "blocks.*.mlp.fc2", "rank": 2},
        {"kind": "lokr", "at": "blocks.*.mlp.fc2", "rank": 2},
    ]
    built = build(spec("vit", *rules), verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    train(built)
    result = export_merged(built, tmp_path / "merged.safetensors")
    assert result["verify"].ok
    merged = merged_state_dict(built)
    assert len(merged.folds) == len(built.manifest.tuners())  # BOFT's rotation and scale are two folds
    plain = plain_model(built)
    plain.load_state_dict(merged.state, strict=True)
    x = torch.randn(3, *built.input_size, generator=torch.Generator().manual_seed(9))
    tuned, out = forward_eval(built.model, x), forward_eval(plain, x)
    assert not torch.equal(tuned, forward_eval(built.base, x))
    assert float((tuned - out).abs().max()) <= 1e-5 * float(tuned.abs().max())


def test_grouped_conv_lora_has_one_pair_per_group() -> None:
    """ConvNeXt's 7x7 depthwise convs (groups = C): A (C*r, 1, 7, 7), B (C, r, 1, 1) per layer."""
    built = build(spec("convnext", {"kind": "lora", "at": "stages.*.blocks.*.conv_dw", "rank": 2}), verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    expected = 0
    for entry in built.manifest.rule("r0"):
        conv = built.model.get_submodule(entry.site)
        assert conv.groups == conv.in_channels > 1
        expected += conv.out_channels * 2 * 49 + conv.out_channels * 2
        lora = built.model.get_submodule(entry.module)
        assert tuple(lora.delta_weight().shape) == tuple(conv.weight.shape)
    assert built.report["tuner_params"] == expected
    with pytest.raises(ExportError, match=r"grouped \(groups=\d+\); PEFT's grouped LoRA is another form"):
        export_peft(built, Path("unused"), verify=False)


def test_vera_frozen_projections_are_stored_once_and_load_back(tmp_path: Path) -> None:
    built = build(spec("deit", {"kind": "vera", "at": "blocks.*.mlp.fc*", "rank": 8}))
    train(built)
    path = tmp_path / "vera.safetensors"
    export_tuners(built, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("/vera_A") for k in keys) == 1 and sum(k.endswith("/vera_B") for k in keys) == 1
    assert sum(k.endswith("/vera_lambda_b") for k in keys) == 4  # fc1 and fc2 of 2 blocks
    fresh = build(spec("deit", {"kind": "vera", "at": "blocks.*.mlp.fc*", "rank": 8}))
    load_tuners(fresh, path)
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(forward_eval(fresh.model, x), forward_eval(built.model, x))
    mods = [fresh.model.get_submodule(m) for m in fresh.tuner_modules["r0"]]
    assert all(m.vera_A is mods[0].vera_A and not m.vera_A.requires_grad for m in mods)
    # A is sized for the largest input (fc2's 768) and B for the largest output (fc1's 768); fc1 reads A[:, :192]
    assert tuple(mods[0].vera_A.shape) == (8, 768) and tuple(mods[0].vera_B.shape) == (768, 8)


def test_boft_rotation_and_scale_round_trip_through_a_tuner_file(tmp_path: Path) -> None:
    """BOFT attaches two modules per layer (the rotation, and the scale under role ``scale``)."""
    rule = {"kind": "boft", "at": "blocks.*.mlp.fc1", "block_size": 4, "butterfly_factor": 2}
    built = build(spec("vit", rule))
    train(built)
    path = tmp_path / "boft.safetensors"
    export_tuners(built, path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "r0/blocks.0.mlp.fc1/boft_R" in keys and "r0/blocks.0.mlp.fc1#scale/boft_s" in keys
    fresh = build(spec("vit", rule))
    load_tuners(fresh, path)
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(forward_eval(fresh.model, x), forward_eval(built.model, x))


def test_dora_on_q_and_v_leaves_the_k_rows_exactly_frozen() -> None:
    built = build(spec("vit", {"kind": "dora", "at": "blocks.*.attn.qkv", "slices": ["q", "v"]}))
    train(built)
    c = 64
    state = merged_state_dict(built).state
    base = built.base.state_dict()
    for i in range(3):
        w, w0 = state[f"blocks.{i}.attn.qkv.weight"], base[f"blocks.{i}.attn.qkv.weight"]
        assert torch.equal(w[c : 2 * c], w0[c : 2 * c]) and not torch.equal(w[:c], w0[:c])
        assert built.model.get_submodule(f"utune.r0.blocks_{i}_attn_qkv").magnitude.shape == (2 * c,)


@pytest.mark.parametrize(
    ("arch", "rule", "error", "match"),
    [
        ("resnet", {"kind": "oft", "at": "layer1.0.conv1"}, SelectionError, "it is a Conv2d; OFT's rotation"),
        ("resnet", {"kind": "boft", "at": "layer1.0.conv1"}, SelectionError, "it is a Conv2d; BOFT's rotation"),
        ("resnet", {"kind": "glora", "at": "layer1.0.conv1"}, SelectionError, "GLoRA is defined on Linear"),
        ("resnet", {"kind": "vera", "at": "layer1.0.conv1"}, SelectionError, "VeRA is defined on Linear"),
        ("vit", {"kind": "oft", "at": "blocks.0.attn.qkv", "block_size": 24}, SelectionError, r"\[4, 8, 16, 32\]"),
        ("vit", {"kind": "oft", "at": "blocks.0.attn.qkv", "blocks": 7}, SelectionError, "blocks: 7 does not divide"),
        ("vit", {"kind": "boft", "at": "blocks.0.attn.qkv", "block_size": 1, "butterfly_factor": 2},
         SelectionError, "need an even block size"),
        ("vit", {"kind": "boft", "at": "blocks.0.attn.qkv", "block_size": 16, "butterfly_factor": 4},
         SelectionError, r"divisible by 8 \(here 4 blocks of 16\)"),
        ("vit", {"kind": "oft", "at": "blocks.0.attn.qkv", "block_size": 8, "blocks": 8}, SpecError, "not both"),
        ("vit", {"kind": "lokr", "at": "blocks.0.attn.qkv", "decompose_factor": 0}, SpecError, "decompose_factor"),
        ("vit", {"kind": "dora", "at": "blocks.0.mlp.fc1", "slices": ["q"]}, SelectionError, "need a fused qkv"),
        ("vit", {"kind": "vera", "at": "blocks.0.mlp.fc1", "slices": ["v"]}, SelectionError, "need a fused qkv"),
        ("vit", {"kind": "loha", "at": "blocks.0.mlp"}, SelectionError, "changes the weight of a Linear or Conv2d"),
        ("vit", {"kind": "oft", "at": "blocks.0.attn.qkv", "placement": "parallel"}, SpecError, "no placement"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_clear_error(arch: str, rule: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match) as e:
        build(spec(arch, rule))
    assert e.value.hint, "every refusal says what to do instead"

"""Tuner behaviour beyond the contract matrix: sliced LoRA, stacking rules, counts, clear refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.archs import model_section
from utune.engine.build import build
from utune.errors import SelectionError, UtuneError


def spec(arch: str, *rules: dict[str, Any], trainable: list[str] | None = None) -> dict[str, Any]:
    return {"version": 1, "model": model_section(arch, 5), "tuners": list(rules), "trainable": trainable or []}


def test_sliced_lora_leaves_k_bit_exact_after_training() -> None:
    torch.manual_seed(0)
    built = build(spec("vit", {"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "slices": ["q", "v"]}))
    model = built.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, *built.input_size)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora = model.get_submodule("utune.lo.blocks_0_attn_qkv")
    c = 64
    delta = lora.delta_weight()
    assert delta[:c].abs().sum() > 0 and delta[2 * c :].abs().sum() > 0  # q and v trained
    assert torch.count_nonzero(delta[c : 2 * c]) == 0  # k untouched
    tokens = torch.randn(2, 7, c)
    with torch.no_grad():
        out = lora(tokens)
        assert torch.count_nonzero(out[..., c : 2 * c]) == 0 and out[..., :c].abs().sum() > 0
    assert {k for k in lora.state_dict()} == {f"branches.{s}.lora_{m}.weight" for s in "qv" for m in "AB"}


def test_rules_stack_on_the_same_sites_and_stay_identity() -> None:
    built = build(
        spec(
            "vit",
            {"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 2},
            {"name": "sf", "kind": "ssf", "at": "blocks.*.attn.qkv"},
            {"name": "mha", "kind": "adapter", "at": "blocks.*.attn", "tap": "parent.input"},
            {"name": "mha2", "kind": "adapter", "at": "blocks.*.attn", "scale": "gate"},
            {"name": "ffn", "kind": "adapter", "at": "blocks.*.mlp"},
            {"name": "blk", "kind": "prefix", "at": "blocks.*", "placement": "parallel"},
            {"name": "pp", "kind": "prompt", "at": "blocks.*.mlp", "placement": "parallel"},
        ),
        verify=True,
    )
    assert built.report["identity_max_abs_diff"] == 0.0
    assert [t["name"] for t in built.report["tuners"]] == ["lo", "sf", "mha", "mha2", "ffn", "blk", "pp"]


def test_adapter_parameter_count_matches_the_arithmetic() -> None:
    built = build(spec("vit", {"name": "a", "kind": "adapter", "at": "blocks.*.mlp", "dim": 10}))
    # down 64*10+10, up 10*64+64, channel scale 64, 6 blocks
    assert built.report["tuners"][0]["params"] == 6 * (64 * 10 + 10 + 10 * 64 + 64 + 64)


def test_vpt_prompts_are_removed_before_pooling() -> None:
    # test_vit2 averages all tokens: with prompts left in, the output would depend on them
    torch.manual_seed(0)
    built = build(spec("vit_avg", {"name": "p", "kind": "prompt", "at": "blocks.*", "length": 3}))
    model = built.model.eval()
    x = torch.randn(2, *built.input_size)
    ref = model(x)
    captured: dict[str, int] = {}

    def count_tokens(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        captured["n"] = output.shape[1]

    handle = model.get_submodule("norm").register_forward_hook(count_tokens)
    model(x)
    handle.remove()
    assert captured["n"] == (160 // 16) ** 2 + 1  # patches + class token: the 3 prompts are gone
    assert ref.shape == (2, 5)


def test_vpt_deep_count() -> None:
    built = build(spec("vit", {"name": "p", "kind": "prompt", "at": "blocks.*", "length": 10}))
    assert built.report["tuners"][0]["params"] == 6 * 10 * 64
    shallow = build(spec("vit", {"name": "p", "kind": "prompt", "at": "blocks.0", "length": 10}))
    assert shallow.report["tuners"][0]["params"] == 10 * 64


@pytest.mark.parametrize(
    ("arch", "rule", "message"),
    [
        ("resnet", {"name": "p", "kind": "prefix", "at": "layer1.0.conv1"}, "prefix cannot attach to layer1.0.conv1"),
        ("vit", {"name": "l", "kind": "lora", "at": "blocks.0.norm1"}, "needs a Linear or Conv2d"),
        ("vit", {"name": "l", "kind": "lora", "at": "blocks.*.mlp.fc1", "slices": ["q"]}, "fused qkv"),
        (
            "tv_vit",
            {"name": "p", "kind": "prefix", "at": "encoder.layers.*.self_attention.out_proj"},
            "cannot see into",
        ),
        ("resnet", {"name": "p", "kind": "prompt", "at": "layer1.*"}, "not a (B, N, C) token sequence"),
        ("resnet", {"name": "p", "kind": "prefix", "at": "layer1.0", "placement": "parallel"}, "query projection"),
        ("beit", {"name": "l", "kind": "lora", "at": "blocks.0.attn.qkv"}, "never called as modules"),
        ("vit", {"name": "nothing", "kind": "adapter", "at": "blocks.*.ffn"}, "'nothing'"),
    ],
)
def test_refusals_name_rule_and_site(arch: str, rule: dict[str, Any], message: str) -> None:
    with pytest.raises(UtuneError) as e:
        build(spec(arch, rule))
    assert message in str(e.value)
    assert e.value.exit_code == 2
    if isinstance(e.value, SelectionError):
        assert repr(rule["name"]) in e.value.message


def test_merge_math_of_lora_is_exact() -> None:
    torch.manual_seed(0)
    built = build(spec("resnet", {"name": "l", "kind": "lora", "at": "layer1.0.conv1", "rank": 3, "alpha": 6}))
    lora = built.model.get_submodule("utune.l.layer1_0_conv1")
    torch.nn.init.normal_(lora.branch.lora_B.weight)
    conv = built.model.get_submodule("layer1.0.conv1")
    x = torch.randn(2, conv.in_channels, 9, 9)
    merged = torch.nn.functional.conv2d(x, conv.weight + lora.delta_weight(), conv.bias, conv.stride, conv.padding)
    with torch.no_grad():
        torch.testing.assert_close(conv(x) + lora(x), merged, atol=1e-5, rtol=1e-5)

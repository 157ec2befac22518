"""Sites and selectors: naming, every selector form, no-match errors, never-called layers."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.archs import ARCHS
from utune.engine.build import Traced, trace_model
from utune.errors import SelectionError
from utune.graph.glob import glob_match
from utune.graph.select import Selector, select
from utune.models import create_model


@functools.cache
def traced(arch: str) -> Traced:
    name, kwargs, size = ARCHS[arch]
    return trace_model(create_model(name, num_classes=5, kwargs=kwargs), name, size)


def pick(arch: str, at: object, rule: str = "r") -> list[str]:
    return [s.path for s in select(traced(arch).sites, Selector.model_validate(at), rule).sites]


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("blocks.*.attn.qkv", "blocks.3.attn.qkv", True),
        ("blocks.*.qkv", "blocks.3.attn.qkv", False),
        ("**.qkv", "blocks.3.attn.qkv", True),
        ("blocks.**", "blocks.3.attn.qkv", True),
        ("blocks.**.qkv", "blocks.qkv", True),
        ("head", "head.fc", False),
        ("layer[12].*", "layer1.0", True),
        ("blocks.1?", "blocks.1", False),
    ],
)
def test_glob_semantics(pattern: str, path: str, hit: bool) -> None:
    assert glob_match(pattern, path) is hit


def test_site_names_are_module_paths_and_local_op_numbers() -> None:
    sites = traced("vit").sites
    assert sites["blocks.0.attn.qkv"].op == "module" and sites["blocks.0.attn.qkv"].type == "Linear"
    assert sites["blocks.0.attn"].op == "composite" and sites["blocks.0"].type == "Block"
    assert sites["blocks.0.attn::scaled_dot_product_attention"].op == "function"
    assert "blocks.0.attn::reshape_1" in sites  # second reshape in the same module
    assert sites["blocks.0.attn"].output is not None and sites["blocks.0.attn"].input is not None


def test_vit_base_has_twelve_fused_qkv_sites() -> None:
    t = trace_model(create_model("vit_base_patch16_224"), "vit_base_patch16_224")
    qkv = [s for s in select(t.sites, Selector.model_validate("blocks.*.attn.qkv")).sites]
    assert len(qkv) == 12 and all(s.module.out_features == 3 * 768 for s in qkv)
    assert qkv[0].shape() == (2, 197, 2304)


def test_glob_list_and_order() -> None:
    got = pick("vit", ["blocks.*.mlp", "blocks.*.attn"])
    assert got[:2] == ["blocks.0.attn", "blocks.0.mlp"]  # graph order, not pattern order
    assert len(got) == 2 * len(pick("vit", "blocks.*"))


def test_type_selector_includes_subclasses() -> None:
    norms = pick("vit", {"type": "LayerNorm"})  # timm's LayerNorm subclasses torch's
    assert "blocks.0.norm1" in norms and "norm" in norms
    convs = pick("resnet", {"path": "layer1.**", "type": "Conv2d"})
    assert convs and all(p.startswith("layer1.") for p in convs)


def test_op_selector_inside_modules() -> None:
    got = pick("vit", {"path": "blocks.*.attn", "op": "scaled_dot_product_attention"})
    assert got == [f"blocks.{i}.attn::scaled_dot_product_attention" for i in range(len(got))]
    assert pick("vit", "blocks.0.attn::scaled*") == ["blocks.0.attn::scaled_dot_product_attention"]


def test_layer_range_and_exclude() -> None:
    got = pick("vit", {"path": "blocks.*.attn.qkv", "layers": "1-2"})
    assert got == ["blocks.1.attn.qkv", "blocks.2.attn.qkv"]
    got = pick("vit", {"path": "blocks.*", "exclude": ["blocks.0", "blocks.2"]})
    assert "blocks.0" not in got and "blocks.2" not in got and "blocks.1" in got


def test_exclude_that_removes_nothing_warns() -> None:
    sel = select(traced("vit").sites, Selector.model_validate({"path": "blocks.*", "exclude": "nothing.here"}), "r")
    assert any("removed nothing" in w for w in sel.warnings)


def test_no_match_names_closest_sites() -> None:
    with pytest.raises(SelectionError) as e:
        pick("vit", "blocks.*.atn.qkv", rule="lora")
    assert "'lora'" in e.value.message and "matches no site" in e.value.message
    assert "blocks.0.attn.qkv" in (e.value.hint or "")
    assert e.value.exit_code == 2


def test_no_match_on_type_suggests_types() -> None:
    with pytest.raises(SelectionError) as e:
        pick("vit", {"type": "Linaer"})
    assert "Linear" in (e.value.hint or "")


def test_beit_qkv_read_through_f_linear_is_reported_not_skipped() -> None:
    sites = traced("beit").sites
    qkv = sites["blocks.0.attn.qkv"]
    assert qkv.op == "uncalled" and "reads its weights directly" in qkv.reason
    with pytest.raises(SelectionError, match="never called as modules"):
        pick("beit", "blocks.*.attn.qkv")
    # among other matches: kept out, with a warning
    sel = select(sites, Selector.model_validate({"path": "blocks.0.attn.*", "type": "Linear"}), "r")
    assert [s.path for s in sel.sites] == ["blocks.0.attn.proj"] and sel.warnings


def test_torchvision_multihead_attention_is_traced_through() -> None:
    sites = traced("tv_vit").sites
    mha = "encoder.layers.encoder_layer_0.self_attention"
    assert sites[mha].op == "composite" and sites[mha].type == "MultiheadAttention"
    assert sites[f"{mha}.in_proj"].op == "module" and sites[f"{mha}.in_proj"].type == "PackedLinear"
    assert sites[f"{mha}.out_proj"].op == "module"
    assert sites[f"{mha}::scaled_dot_product_attention"].op == "function"  # the attention prefix tuning extends


class _CrossAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, 4)
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.mha(t, t * 2, t * 2)[0].mean(1)  # not self-attention: one leaf call, as torch runs it


def test_a_multihead_attention_utune_cannot_trace_through_reports_its_internals() -> None:
    sites = trace_model(_CrossAttention(), "cross", 16).sites
    out_proj = sites["mha.out_proj"]
    assert out_proj.op == "uncalled" and "MultiheadAttention" in out_proj.reason
    assert sites["mha"].op == "module"


def test_selector_short_forms_normalise() -> None:
    assert Selector.model_validate("a.b").path == ["a.b"]
    assert Selector.model_validate(["a", "b"]).path == ["a", "b"]
    assert Selector.model_validate({"path": "a", "layers": "0,2-3"}).layers == [0, 2, 3]
    with pytest.raises(ValueError):
        Selector.model_validate({"path": "a", "layers": "3-1"})


def test_every_glob_of_an_at_list_must_match() -> None:
    with pytest.raises(SelectionError) as e:
        pick("vit", ["blocks.*.attn.qkv", "blocks.*.mlp.fc3"], rule="lora")
    assert "glob 'blocks.*.mlp.fc3' of its `at:` list" in e.value.message
    assert "blocks.0.mlp.fc1" in (e.value.hint or "")  # the closest sites
    with pytest.raises(SelectionError, match="'blocks.\\*.nope' of its `at:` list"):
        pick("vit", {"path": ["blocks.*.attn.qkv", "blocks.*.nope"], "type": "Linear"})


def test_exclude_that_removes_nothing_names_the_closest_sites() -> None:
    sel = select(traced("vit").sites, Selector.model_validate({"path": "blocks.*", "exclude": "blocks.0.atn"}), "r")
    assert any("removed nothing" in w and "blocks.0.attn" in w for w in sel.warnings)


def test_layers_beyond_the_model_warn() -> None:
    n = len(pick("vit", "blocks.*"))
    sel = select(traced("vit").sites, Selector.model_validate({"path": "blocks.*", "layers": f"1-{n + 3}"}), "r")
    assert [s.path for s in sel.sites] == [f"blocks.{i}" for i in range(1, n)]
    assert any(f"layers {n}-{n + 3} do not exist" in w and f"0-{n - 1}" in w for w in sel.warnings)

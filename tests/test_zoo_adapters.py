"""The adapter-style and structural methods of the zoo, beyond the contract matrix: each kind against an
independent re-statement of its paper's official forward, the spec-format and kind options they needed, and
the mergeable reference specs merged after training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.archs import model_section
from utune.engine.build import Built, build
from utune.errors import SelectionError, SpecError
from utune.export import export_tuners, load_tuners, merged_state_dict
from utune.export.merge import forward_eval, plain_model
from utune.spec import load_spec, spec_json_schema
from utune.tuners.convpass import Convpass, ConvpassOptions
from utune.tuners.fact import Fact, FactOptions
from utune.tuners.repadapter import RepAdapter, RepAdapterOptions


def spec(rules: list[dict[str, Any]], arch: str = "vit", trainable: Any = ("head",)) -> dict[str, Any]:
    return {"version": 1, "model": model_section(arch, num_classes=5), "tuners": rules, "trainable": list(trainable)}


def steps(built: Built, n: int = 2, lr: float = 1e-2) -> None:
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        x, y = torch.randn(2, *built.input_size, generator=gen), torch.randint(0, 5, (2,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


# ---- trainable: {type: ...} ------------------------------------------------------------------------------


def test_trainable_by_type_opens_every_norm_and_only_them(tmp_path: Path) -> None:
    built = build(spec([], trainable=[{"type": "LayerNorm"}]))
    norms = {
        f"{n}.{p}" for n, m in built.base.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")
    }
    assert {n for n, p in built.model.named_parameters() if p.requires_grad} == norms
    assert list(built.report["trainable"]) == ["type=LayerNorm"]
    steps(built)
    export_tuners(built, tmp_path / "t.safetensors")  # the spec with a mapping in `trainable:` round-trips
    fresh = build(spec([], trainable=[{"type": "LayerNorm"}]))
    load_tuners(fresh, tmp_path / "t.safetensors")
    x = torch.randn(2, *built.input_size)
    assert torch.equal(forward_eval(fresh.model, x), forward_eval(built.model, x))


def test_trainable_by_type_under_a_path() -> None:
    built = build(spec([], trainable=["head", {"type": "LayerNorm", "path": "blocks.0.*"}]))
    opened = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert sorted(opened) == sorted(
        ["head.weight", "head.bias"] + [f"blocks.0.norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    )
    assert list(built.report["trainable"]) == ["head", "type=LayerNorm, path=blocks.0.*"]


def test_trainable_by_type_errors_say_what_to_write() -> None:
    with pytest.raises(SelectionError, match=r"\{type=BatchNorm2d\} matches no parameter") as e:
        build(spec([], trainable=[{"type": "BatchNorm2d"}]))
    assert "LayerNorm" in (e.value.hint or "")
    with pytest.raises(SpecError) as s:
        load_spec(spec([], trainable=[{"tipe": "LayerNorm"}]))
    assert "unknown key 'tipe' (a type entry takes: type, path)" in str(s.value.problems)
    items = spec_json_schema()["properties"]["trainable"]["anyOf"][1]["items"]["anyOf"]
    assert {"$ref": "#/$defs/TypeSelector"} in items and "TypeSelector" in spec_json_schema()["$defs"]


# ---- prompt: one length per block (NOAH) -----------------------------------------------------------------


def test_prompt_lengths_per_block_replace_the_previous_blocks_prompts() -> None:
    lengths = [3, 1, 4, 1, 5, 2]  # test_vit has 6 blocks
    built = build(spec([{"name": "p", "kind": "prompt", "at": "blocks.*", "placement": "concat", "length": lengths}]))
    assert built.report["tuners"][0]["params"] == sum(lengths) * 64
    seen: list[int] = []
    for entry in built.manifest.rule("p"):
        built.model.get_submodule(entry.module).register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        built.model(torch.randn(1, *built.input_size))
    n = 101  # class token + 10 x 10 patches
    assert seen == [n + length for length in lengths] + [n]  # each block sees only its own prompts; then none
    with pytest.raises(SelectionError, match="lists 2 prompt lengths but the rule selects 6 blocks"):
        build(spec([{"name": "p", "kind": "prompt", "at": "blocks.*", "placement": "concat", "length": [1, 2]}]))


# ---- adapter: Houlsby init, drop-path ------------------------------------------------------------------------


def test_adapter_houlsby_init_is_the_truncated_normal_and_not_the_identity() -> None:
    rule = {"name": "a", "kind": "adapter", "at": "blocks.*", "placement": "sequential", "dim": 8}
    built = build(spec([{**rule, "init": "houlsby", "drop_path": 0.5}]), verify=True)
    assert built.report["tuners"][0]["identity_at_init"] is False
    assert 0 < built.report["identity_max_abs_diff"] < 1e-2  # close to, not exactly, the base
    w = torch.cat([built.model.get_submodule(m).down.weight.detach().flatten() for m in built.tuner_modules["a"]])
    assert float(w.abs().max()) <= 0.02 and 0.006 < float(w.std()) < 0.01  # N(0, 0.01) cut at 2 std: std 0.0088
    module = built.model.get_submodule(built.tuner_modules["a"][0])
    x = torch.randn(64, 5, 64)
    module.train()
    dropped = (module(x).abs().sum(dim=(1, 2)) == 0).float().mean()
    assert 0.2 < float(dropped) < 0.8  # whole samples dropped at p = 0.5 in training
    module.eval()
    assert bool((module(x).abs().sum(dim=(1, 2)) > 0).all())
    assert build(spec([rule]), verify=True).report["identity_max_abs_diff"] == 0.0  # init: zero


# ---- Convpass ---------------------------------------------------------------------------------------------


def _official_convpass(m: Convpass, x: torch.Tensor, side: int) -> torch.Tensor:
    """The official forward (PETL-ViT convpass.py), restated: a class token, then a side x side grid."""
    quick_gelu = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731
    b, n, _ = x.shape
    h = quick_gelu(m.down(x))
    patch = m.conv(h[:, 1:].reshape(b, side, side, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n - 1, -1)
    cls = m.conv(h[:, :1].reshape(b, 1, 1, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, 1, -1)
    return m.up(quick_gelu(torch.cat([cls, patch], dim=1))) * m.scale


def test_convpass_matches_the_official_forward_class_token_as_a_1x1_image() -> None:
    torch.manual_seed(0)
    m = Convpass(32, 32, ConvpassOptions(dim=8, scale=0.5, conv_init="xavier", dropout=0.0), -1, (1, 4, 4)).eval()
    nn.init.normal_(m.up.weight)  # leave the identity init, so the comparison sees every path
    x = torch.randn(2, 17, 32)
    assert torch.allclose(m(x), _official_convpass(m, x, 4), atol=1e-6)
    cls = F.linear(m.act(m.down(x[:, 0])), m.conv.weight[:, :, 1, 1], m.conv.bias)
    assert torch.allclose(m(x)[:, 0], m.up(m.act(cls)) * 0.5, atol=1e-6)  # the centre tap and the bias only


def test_convpass_refuses_tokens_that_are_not_a_grid() -> None:
    rule = {"name": "c", "kind": "convpass", "at": "blocks.*.attn", "prefix_tokens": 3}
    with pytest.raises(SelectionError, match="101 tokens minus 3 prefix token.s. do not form") as e:
        build(spec([rule]))
    assert "grid: [H, W]" in (e.value.hint or "")
    assert build(spec([{**rule, "prefix_tokens": 1, "grid": [5, 20]}])).report["tuner_params"] > 0


# ---- RepAdapter --------------------------------------------------------------------------------------------


def test_repadapter_is_the_official_dense_sparse_adapter() -> None:
    """x + s * conv_B(dropout(conv_A(x))) with conv_B a grouped 1x1 Conv1d, as luogen1996/RepAdapter builds it."""
    torch.manual_seed(0)
    m = RepAdapter(24, RepAdapterOptions(dim=8, groups=2, scale=0.7, dropout=0.0), -1).eval()
    conv_a, conv_b = nn.Conv1d(24, 8, 1), nn.Conv1d(8, 24, 1, groups=2)
    with torch.no_grad():
        m.B.normal_()
        m.B_bias.normal_()
        conv_a.weight.copy_(m.A.weight[..., None])
        conv_a.bias.copy_(m.A.bias)
        conv_b.weight.copy_(m.B.flatten(0, 1)[..., None])  # group g: outputs g*12.., inputs g*4..
        conv_b.bias.copy_(m.B_bias)
    x = torch.randn(2, 5, 24)
    ref = (conv_b(conv_a(x.transpose(1, 2))) * 0.7 + x.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_repadapter_on_a_composite_site_runs_but_says_why_it_does_not_fold() -> None:
    built = build(spec([{"name": "r", "kind": "repadapter", "at": "blocks.*.attn"}]), verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    steps(built)
    with pytest.raises(Exception, match="the site is not one Linear/Conv"):
        merged_state_dict(built)


# ---- FacT ---------------------------------------------------------------------------------------------


def test_fact_tt_slices_are_the_official_layout() -> None:
    """fact_tt.py: qkv += cat(V(q_s(U x)), ...); fc1 += V(fc1_s(U x) as 4 x r); fc2 += V(fc2_s(U(x as 4 x C)))."""
    torch.manual_seed(0)
    r, d, opts = 4, 16, FactOptions(rank=4, dropout=0.0, scale=0.5)
    qkv, fc1, fc2 = Fact(1, 3, d, opts, 12), Fact(1, 4, d, opts, 12), Fact(4, 1, d, opts, 12)
    u, v = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
    s_q, s_fc1, s_fc2 = (
        [nn.Linear(r, r, bias=False) for _ in range(3)],
        nn.Linear(r, 4 * r, bias=False),
        nn.Linear(4 * r, r, bias=False),
    )
    with torch.no_grad():
        for m in (qkv, fc1, fc2):
            m.U.weight.copy_(u.weight)
            m.V.weight.copy_(v.weight)
        qkv.cores.copy_(torch.stack([lin.weight.T for lin in s_q])[None])
        fc1.cores.copy_(s_fc1.weight.view(4, r, r).transpose(1, 2)[None])
        fc2.cores.copy_(s_fc2.weight.view(r, 4, r).permute(1, 2, 0)[:, None])
    x, h = torch.randn(2, 3, d), torch.randn(2, 3, 4 * d)
    assert torch.allclose(qkv(x), torch.cat([v(lin(u(x))) for lin in s_q], dim=-1) * 0.5, atol=1e-6)
    assert torch.allclose(fc1(x), v(s_fc1(u(x)).view(2, 3, 4, r)).view(2, 3, 4 * d) * 0.5, atol=1e-6)
    assert torch.allclose(fc2(h), v(s_fc2(u(h.view(2, 3, 4, d)).view(2, 3, 4 * r))) * 0.5, atol=1e-6)
    for m, inp in ((qkv, x), (fc1, x), (fc2, h)):  # the fold is the same map
        assert torch.allclose(F.linear(inp.double(), m.delta_weight()).float(), m(inp), atol=1e-6)


def test_fact_tk_cores_are_the_shared_tensor_times_p() -> None:
    """fact_tk.py: q = V(U(x) @ (C @ P[:, k])) for each slice k of the 144."""
    torch.manual_seed(0)
    m = Fact(1, 3, 16, FactOptions(form="tk", rank=4, dropout=0.0, scale=0.1), 144)
    nn.init.normal_(m.V.weight)
    x = torch.randn(2, 3, 16)
    ref = [m.V(m.U(x) @ (m.C @ m.P[:, 0, i])) * 0.1 for i in range(3)]
    assert torch.allclose(m(x), torch.cat(ref, dim=-1), atol=1e-6)


@pytest.mark.parametrize("form", ["tt", "tk"])
def test_fact_shares_u_and_v_across_every_layer(form: str, tmp_path: Path) -> None:
    rule = {"name": "f", "kind": "fact", "form": form, "at": {"path": "blocks.*.**", "type": "Linear"}, "rank": 4}
    built = build(spec([rule]))
    mods = [built.model.get_submodule(m) for m in built.tuner_modules["f"]]
    assert len(mods) == 24 and all(m.U.weight is mods[0].U.weight and m.V.weight is mods[0].V.weight for m in mods)
    slices, r, d = 6 * 10, 4, 64  # a block: qkv 3 + proj 1 + fc1 3 + fc2 3 (mlp ratio 3)
    per_slice = r * r if form == "tt" else r
    assert built.report["tuner_params"] == 2 * d * r + slices * per_slice + (r**3 if form == "tk" else 0)
    steps(built)
    path = tmp_path / "f.safetensors"
    export_tuners(built, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sum(k.endswith("U.weight") for k in f.keys()) == 1  # stored once
    result = merged_state_dict(built)
    assert len(result.folds) == 24


# ---- VQT -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit", "vit_reg"])
def test_vqt_leaves_every_original_token_unchanged_bit_for_bit(arch: str) -> None:
    rules = [{"name": "q", "kind": "vqt", "at": {"path": "blocks.*", "layers": "0,2,3"}, "length": 3}]
    built = build(spec(rules, arch, trainable=[]))
    seen: list[torch.Tensor] = []
    hook = built.base.norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))  # the final norm's input
    x = torch.randn(2, *built.input_size)
    with torch.no_grad():
        built.base.eval()(x)
        built.model.eval()(x)
    hook.remove()
    assert seen[0].shape == seen[1].shape and torch.equal(seen[0], seen[1])
    head = built.model.get_submodule(built.manifest.rule("q")[-1].module)
    blocks = len(built.report["tuners"][0]["sites"])  # 3 of test_vit's 6 blocks; 1 of vit_reg's 2
    assert blocks == {"vit": 3, "vit_reg": 1}[arch]
    assert head.fc.in_features == built.base.head.in_features * (1 + 3 * blocks)


def test_vqt_outputs_read_the_queries() -> None:
    built = build(spec([{"name": "q", "kind": "vqt", "at": "blocks.*"}], trainable=[]))
    out = built.model(torch.randn(2, *built.input_size))
    out.square().sum().backward()
    grads = [built.model.get_submodule(e.module).queries.grad for e in built.manifest.rule("q") if e.role == "queries"]
    assert len(grads) == 6 and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


# ---- the mergeable reference specs, merged after training ------------------------------------------------------

MERGEABLE_SPECS = ["repadapter", "fact_tt", "fact_tk", "difffit", "ln_tune"]


@pytest.mark.parametrize("name", MERGEABLE_SPECS)
def test_reference_spec_merges_after_training(name: str) -> None:
    from tests.test_specs_reference import build_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = build_spec(f"vit_b16_cifar100/{name}.yaml")  # ViT-B/16 at 32 px: the same tuners, fewer tokens
        x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(5))
        before = forward_eval(built.model, x)
        steps(built, n=2, lr=3e-2)
        result = merged_state_dict(built)
        plain = plain_model(built)
        plain.load_state_dict(result.state, strict=True)
        tuned, merged = forward_eval(built.model, x), forward_eval(plain, x)
    finally:
        torch.set_num_threads(threads)
    diff, scale = float((tuned - merged).abs().max()), float(tuned.abs().max())
    assert float((tuned - before).abs().max()) > 1e-3 * scale, "training did not move the tuned model"
    assert diff <= 1e-4 * scale, f"{name}: merged differs by {diff:.3g} (output scale {scale:.3g})"


def test_the_digits_benchmark_runs_and_merges(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "zoo_digits.py"
    cmd = [sys.executable, str(script), "--methods", "fact_tt,vqt", "--out", str(tmp_path), "--name", "t"]
    proc = subprocess.run([*cmd, "train.max_steps=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["key"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    fact = rows["fact_tt"]  # the plain model scores the same, up to a 1e-6 tie on one of the 360 digits
    assert abs(fact["merged_plain_test_acc"] - fact["test_acc"]) <= 1 / 360 and fact["merged_max_abs_diff"] < 1e-4
    assert "merged_plain_test_acc" not in rows["vqt"] and rows["vqt"]["trainable_params"] > 0

"""The fast build (meta creation from a weights file, one trace, shapes on meta) builds what the old one did.

The old path stays reachable through ``utune._reference.reference()``: it creates the model for real (timm's
init, then the copy), traces it in train and eval mode and propagates shapes with real forwards. Each case
builds the same spec both ways and compares every tensor (tuners, frozen weights, buffers, non-persistent
ones included), the graph, the report and the outputs, bit for bit; from random init and from a file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import utune.models
from tests.archs import ARCHS, HEADS, model_section
from tests.test_tuners_contract import spec_for
from utune._reference import reference
from utune.engine.build import Built, _trace_by_name, build, inspect
from utune.errors import RewriteError
from utune.models import create_model
from utune.spec import load_spec

# (contract case, arch): six timm and two torchvision architectures; adapter, LoRA, SSF, prefix, prompt, bypass
CASES = [
    ("adapter-parallel", "vit"),
    ("prefix-concat", "vit"),
    ("lora", "deit"),
    ("prompt-parallel", "swin"),
    ("lora", "swin"),
    ("ssf", "convnext"),
    ("bypass", "resnet"),
    ("adapter-parallel", "efficientnet"),
    ("lora", "tv_vit"),
    ("prompt-parallel", "tv_vit"),
    ("adapter-parallel", "tv_resnet"),
]
IDS = [f"{c}-{a}" for c, a in CASES]


def _spec(case: str, arch: str, pretrained: bool | str = False) -> dict[str, Any]:
    spec = spec_for(case, arch)
    spec["model"]["pretrained"] = pretrained
    spec["trainable"] = [HEADS[arch]]
    spec["train"] = {"seed": 7}
    return spec


def _code(built: Built) -> str:
    # fx numbers tensor constants per process, not per graph: two traces of one model differ only there
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", built.model.code)


def _assert_same(fast: Built, ref: Built) -> None:
    a, b = fast.model, ref.model
    sa, sb = dict(a.state_dict(keep_vars=True)), dict(b.state_dict(keep_vars=True))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent buffers too
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert all(t.device.type == "cpu" for t in (*a.parameters(), *a.buffers()))
    assert [n for n, p in a.named_parameters() if p.requires_grad] == [
        n for n, p in b.named_parameters() if p.requires_grad
    ]
    assert _code(fast) == _code(ref)
    drop = ("build_seconds", "timings")
    assert {k: v for k, v in fast.report.items() if k not in drop} == {
        k: v for k, v in ref.report.items() if k not in drop
    }
    assert [e.as_dict() for e in fast.manifest] == [e.as_dict() for e in ref.manifest]
    x = torch.randn(2, *fast.input_size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    a.train(), b.train()
    torch.manual_seed(3)
    ya = a(x)
    torch.manual_seed(3)
    assert torch.equal(ya, b(x))


@pytest.mark.parametrize(("case", "arch"), CASES, ids=IDS)
def test_fast_build_equals_old_build_from_random_init(case: str, arch: str) -> None:
    rng = torch.get_rng_state()
    fast = build(_spec(case, arch))
    with reference():
        ref = build(_spec(case, arch))
    assert torch.equal(torch.get_rng_state(), rng)  # the build's RNG is private
    _assert_same(fast, ref)


def _weights(arch: str, folder: Path, num_classes: int = 5, suffix: str = ".safetensors") -> Path:
    name, kwargs, _ = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # other weights than the build's own seeded init
        model = create_model(name, num_classes=num_classes, kwargs=kwargs)
        with torch.no_grad():  # non-zero everywhere (torchvision heads start at zero)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    path = folder / f"{arch}{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(("case", "arch"), CASES, ids=IDS)
def test_fast_build_equals_old_build_from_a_weights_file(
    case: str, arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _weights(arch, tmp_path, suffix=".pth" if arch == "resnet" else ".safetensors")
    made: list[nn.Module | None] = []
    on_meta = utune.models._from_file_on_meta
    monkeypatch.setattr(
        utune.models, "_from_file_on_meta", lambda make, state: made.append(on_meta(make, state)) or made[-1]
    )
    fast = build(_spec(case, arch, str(path)))
    # torchvision's ViT inits with torch's trunc_normal_, a rejection sampler (its draws depend on values):
    # no replay can know them, so it is created for real
    assert made and (made[0] is None) == (arch == "tv_vit"), "created on meta" if made[0] else "created for real"
    with reference():
        ref = build(_spec(case, arch, str(path)))
    _assert_same(fast, ref)  # the tuners too: the meta init drew what timm's init draws


def test_a_file_for_other_classes_keeps_the_random_head(tmp_path: Path) -> None:
    """A head the file cannot fill keeps timm's seeded init: the model is created for real, as before."""
    path = _weights("vit", tmp_path, num_classes=9)
    fast = build(_spec("adapter-parallel", "vit", str(path)))
    with reference():
        ref = build(_spec("adapter-parallel", "vit", str(path)))
    _assert_same(fast, ref)


def test_a_rule_that_breaks_the_model_is_named_without_a_real_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes propagate on meta; the shape error of prompts on BEiT's fixed relative-position table still
    names the rule, and the model never ran for real until the meta run had failed."""
    import utune.graph.shapes as shapes

    runs: list[str] = []
    real_run = shapes._run
    monkeypatch.setattr(shapes, "_run", lambda gm, x: runs.append(x.device.type) or real_run(gm, x))
    spec = spec_for("prompt-concat", "beit")
    with pytest.raises(RewriteError, match="rule 't'.*fails on a dummy batch"):
        build(spec)
    assert runs[:-1] == ["meta"] * (len(runs) - 1) and runs[-1] == "cpu"  # the real run only confirms the error


def test_build_runs_no_real_forward_unless_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    import utune.graph.shapes as shapes

    runs: list[str] = []
    real_run = shapes._run
    monkeypatch.setattr(shapes, "_run", lambda gm, x: runs.append(x.device.type) or real_run(gm, x))
    build(_spec("adapter-parallel", "vit"))
    assert runs and set(runs) == {"meta"}
    runs.clear()
    built = build(_spec("adapter-parallel", "vit"), verify=True)
    assert "cpu" in runs and built.report["identity_max_abs_diff"] == 0.0


@pytest.mark.parametrize("arch", ["vit", "swin", "convnext", "resnet", "beit", "tv_vit"])
def test_inspect_on_meta_lists_what_the_real_model_lists(arch: str) -> None:
    at = {"type": "Conv2d" if arch in ("resnet", "convnext") else "Linear"}
    spec = {"version": 1, "model": model_section(arch), "tuners": [{"name": "t", "kind": "ssf", "at": at}]}
    with reference():
        ref = inspect(spec["model"]["name"], load_spec(spec))
    assert inspect(spec["model"]["name"], load_spec(spec)) == ref


def test_inspect_allocates_no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a layer for real during inspect fails this test: every weight must be a meta tensor."""

    def meta_only(self: nn.Linear) -> None:
        assert self.weight.device.type == "meta", "inspect created a real weight"

    monkeypatch.setattr(nn.Linear, "reset_parameters", meta_only)
    rows = inspect("vit_base_patch16_224")
    qkv = next(r for r in rows if r["path"] == "blocks.0.attn.qkv")
    assert qkv["shape"] == [2, 197, 2304] and qkv["params"] == 768 * 2304 + 2304


def test_inspect_a_model_too_big_to_allocate() -> None:
    """~1.2e11 parameters (480 GB of float32): a real creation cannot even allocate the first block."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("the kernel overcommits every allocation: a real creation would not fail, it would thrash")
    kwargs = {"embed_dim": 65536, "depth": 2, "num_heads": 64, "patch_size": 16}
    traced = _trace_by_name("vit_base_patch16_224", None, kwargs, 32)  # what inspect runs for a model name
    fc1 = traced.sites["blocks.0.mlp.fc1"]
    assert fc1.shape() == (2, 5, 4 * 65536) and fc1.params == 65536 * 4 * 65536 + 4 * 65536


@pytest.mark.parametrize(("arch", "traces"), [("resnet", 1), ("convnext", 1), ("tv_vit", 1), ("vit", 2)])
def test_traced_once_unless_the_code_reads_the_mode(arch: str, traces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CNN's traced code never reads ``training`` (its dropouts and norms are leaves); timm's attention does
    (``dropout_p=... if self.training``), so a ViT is traced in both modes and the graphs compared."""
    import utune.graph.trace as tr

    calls: list[int] = []
    once = tr._trace_once
    monkeypatch.setattr(tr, "_trace_once", lambda m, n: calls.append(1) or once(m, n))
    name, kwargs, _ = ARCHS[arch]
    tr.trace(create_model(name, num_classes=3, kwargs=kwargs), name)
    assert len(calls) == traces

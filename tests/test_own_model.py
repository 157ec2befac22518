"""Your own model through the Python API: ``utune.build(spec, model=net)`` / ``utune.tune(net, spec)`` on a
custom ``nn.Module``, a timm model built with custom args, an open_clip visual tower and a segmentation
model; weights files read the way timm reads them; models torch.fx cannot trace refused with why.

Everything is real: the modules are the libraries' own classes (random init), the files are written here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import utune
from utune.engine.tuned_ops import built_of
from utune.errors import ModelError, TraceError


class Net(nn.Module):
    """A plain custom module: conv stem, two Linears."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc1 = nn.Linear(width, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).relu().mean((2, 3))
        return self.head(self.fc1(x).relu())


SPEC: dict = {
    "version": 1,
    "model": {"img_size": 16},
    "tuners": [{"name": "lora", "kind": "lora", "at": ["fc1", "head"], "rank": 2}],
}


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _perturb(model: nn.Module, scale: float = 0.1) -> None:
    """Move every trainable tensor off its init (LoRA's B starts at zero: a merge of it proves nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int = 3) -> list[float]:
    """The user's own training loop."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- a custom nn.Module ----------------------------------------------------------------------------------


def test_custom_module_builds_trains_and_merges_into_its_own_class() -> None:
    net = _net()
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    built = utune.build(SPEC, model=net, verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    assert built.report["model"].endswith("test_own_model.Net")
    assert built.report["tuner_params"] == 2 * (8 + 16) + 2 * (16 + 5)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    losses = _steps(built.model, x, y)
    assert losses[-1] < losses[0]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in reference.items())  # only tuners trained
    with built.model.disable_tuners():
        assert torch.equal(built.model(x), net(x))
    merged = built.model.merge_and_unload()
    assert type(merged) is Net
    fresh = _net(seed=3)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    built.model.eval()
    fresh.eval()
    assert (fresh(x) - built.model(x)).abs().max() < 1e-5


def test_tune_is_build_model_and_a_tuner_file_loads_into_a_fresh_instance(tmp_path: Path) -> None:
    from utune.export import export_tuners

    model = utune.tune(_net(), SPEC)
    _perturb(model)
    export_tuners(built_of(model), tmp_path / "t.safetensors")  # the build record the model carries
    again = utune.tune(_net(), SPEC)  # a fresh instance with the same base weights
    again.load_tuners(tmp_path / "t.safetensors")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again(x), model(x))


def test_library_training_run_then_its_tuners_load_into_a_fresh_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from utune.runs import train_run

    monkeypatch.setenv("UTUNE_DATA", str(tmp_path / "data"))
    spec = {
        **SPEC,
        "trainable": ["conv"],
        "data": {"dataset": "digits", "augment": False, "num_workers": 0},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 32, "log_every": 1, "lr": 0.01},
    }
    torch.manual_seed(0)
    built = utune.build(spec, model=Net(num_classes=10))
    summary = train_run(built, tmp_path / "run", resume=False)
    assert summary["step"] == 2 and (tmp_path / "run" / "spec.yaml").is_file()
    torch.manual_seed(0)
    again = utune.build(spec, model=Net(num_classes=10))
    again.model.load_tuners(tmp_path / "run")  # the run folder's checkpoint, checked against the spec
    x = torch.randn(2, 3, 16, 16)
    built.model.eval()
    again.model.eval()
    assert torch.equal(again.model(x), built.model(x))


def test_merged_export_is_keyed_like_the_module_and_peft_export_loads(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from utune.export.run import export

    built = utune.build(SPEC, model=_net())
    _perturb(built.model)
    result = export(built, "merge", tmp_path / "merged.safetensors")
    assert result["verify"].ok
    state = load_file(tmp_path / "merged.safetensors")
    assert sorted(state) == sorted(Net().state_dict())
    peft = export(built, "peft", tmp_path / "peft")
    assert peft["verify"].ok and (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_inspect_and_build_sets_on_a_given_module() -> None:
    net = _net()
    rows = utune.inspect(net, SPEC)
    assert all(p.requires_grad for p in net.parameters())  # inspecting changed nothing on the module
    assert {r["path"]: r["rules"] for r in rows if r["op"] == "module"} == {
        "conv": [],
        "fc1": ["lora"],
        "head": ["lora"],
    }
    other = {**SPEC, "tuners": [{"name": "ia3", "kind": "ia3", "at": "fc1"}]}
    sets = utune.build_sets({"a": SPEC, "b": other}, model=net)
    x = torch.randn(2, 3, 16, 16)
    sets.set_active("b")
    assert torch.allclose(sets(x), net(x))  # both identity at init, one backbone


def test_input_size_from_the_spec_an_argument_or_a_clear_error() -> None:
    no_size = {k: v for k, v in SPEC.items() if k != "model"}
    with pytest.raises(ModelError, match=r"input size of Net is unknown") as e:
        utune.build(no_size, model=_net())
    assert "model.input_size" in (e.value.hint or "")
    assert utune.build(no_size, model=_net(), input_size=(3, 12, 20)).input_size == (3, 12, 20)
    spec = {**no_size, "model": {"input_size": [3, 8, 8]}}
    assert utune.build(spec, model=_net()).report["input_size"] == (3, 8, 8)
    with pytest.raises(ModelError, match=r"names no model"):
        utune.build(no_size)


# ---- a timm model built with custom args -----------------------------------------------------------------


def test_timm_model_with_custom_args_merges_without_a_rebuild_by_name() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, depth=1, num_classes=3)
    spec = {"version": 1, "tuners": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 2}]}
    built = utune.build(spec, model=vit, verify=True)
    assert built.input_size == (3, 32, 32)  # from the model's own patch embed
    assert built.report["identity_max_abs_diff"] == 0.0
    _perturb(built.model)
    merged = built.model.merge_and_unload()
    assert type(merged) is type(vit) and len(merged.blocks) == 1 and merged.head.out_features == 3
    x = torch.randn(2, 3, 32, 32)
    built.model.eval()
    assert (merged.eval()(x) - built.model(x)).abs().max() < 1e-5


# ---- other libraries -------------------------------------------------------------------------------------


def test_open_clip_visual_tower_lora_on_in_proj_and_adapters() -> None:
    transformer = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)

    def tower() -> nn.Module:
        return transformer.VisionTransformer(
            image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32
        )

    visual = tower()
    spec = {
        "version": 1,
        "tuners": [
            {"name": "lora", "kind": "lora", "at": "transformer.resblocks.*.attn.in_proj", "rank": 4},
            {"name": "adapter", "kind": "adapter", "at": "transformer.resblocks.*.mlp"},
        ],
    }
    built = utune.build(spec, model=visual, verify=True)
    assert built.input_size == (3, 32, 32)  # open_clip's image_size
    assert built.report["identity_max_abs_diff"] < 1e-5  # the traced in_proj slices vs MHA's fused kernel
    only_lora = {**spec, "tuners": spec["tuners"][:1]}
    lora = utune.build(only_lora, model=visual)
    _perturb(lora.model, 0.05)
    merged = lora.model.merge_and_unload()
    assert type(merged) is type(visual)
    before = visual.transformer.resblocks[0].attn.in_proj_weight
    assert not torch.equal(merged.transformer.resblocks[0].attn.in_proj_weight, before)  # folded into it
    plain = tower()
    plain.load_state_dict(merged.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    lora.model.eval()
    assert (plain.eval()(x) - lora.model(x)).abs().max() < 1e-5


def test_segmentation_encoder_adapters_train_in_the_users_loop() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=3)
    spec = {
        "version": 1,
        "model": {"img_size": 64},
        "tuners": [{"name": "adapter", "kind": "adapter", "at": "encoder.layer*.*.conv2"}],
        "trainable": ["segmentation_head"],
    }
    built = utune.build(spec, model=unet, verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    model = built.model
    x, mask = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    frozen = unet.encoder.conv1.weight.clone()
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(unet.encoder.conv1.weight, frozen)
    assert model(x).shape == (2, 3, 64, 64)


def test_transformers_model_is_refused_with_why() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    model = transformers.ViTForImageClassification(config)
    spec = {"version": 1, "tuners": [{"name": "lora", "kind": "lora", "at": "**.query", "rank": 2}]}
    with pytest.raises(TraceError, match="Hugging Face transformers model") as e:
        utune.build(spec, model=model)
    assert "timm" in (e.value.hint or "")


# ---- weights files the way timm loads them ---------------------------------------------------------------


def _vit_spec(weights: Path, **model: object) -> dict:
    return {
        "version": 1,
        "model": {"name": "test_vit", "pretrained": str(weights), "num_classes": 5, "img_size": 32, **model},
        "tuners": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 2}],
    }


def test_backbone_only_file_at_its_native_resolution(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=0)  # a feature extractor's file, 160 px
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    built = utune.build(_vit_spec(tmp_path / "backbone.safetensors"))
    notes = " | ".join(built.report["notes"])
    assert "pos_embed (1, 101, 64) -> (1, 5, 64)" in notes and "holds no head" in notes
    assert torch.equal(built.base.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_ddp_ema_checkpoint_and_another_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=7, img_size=32)
    state = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict_ema": state, "epoch": 3}, tmp_path / "ddp.pth")
    built = utune.build(_vit_spec(tmp_path / "ddp.pth"))
    assert any("another class count: re-initialised" in n for n in built.report["notes"])
    assert torch.equal(built.base.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_a_file_that_does_not_fit_names_keys_and_cause(tmp_path: Path) -> None:
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(ModelError, match=r"does not fit VisionTransformer: missing \d+ keys") as e:
        utune.build(_vit_spec(tmp_path / "resnet.safetensors"))
    assert "another architecture" in (e.value.hint or "")
    vit = timm.create_model("test_vit", img_size=32, num_classes=5)
    save_file({"backbone." + k: v for k, v in vit.state_dict().items()}, tmp_path / "prefixed.safetensors")
    with pytest.raises(ModelError, match="unexpected keys") as e:
        utune.build(_vit_spec(tmp_path / "prefixed.safetensors"))
    assert "prefix 'backbone.'" in (e.value.hint or "")

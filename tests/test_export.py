"""Export: merged weights (merged == unmerged after training), tuner-only files, safety, the CLI.

Every model is tiny and built without downloads; "pretrained" weights are a random state dict saved to a
local file, so a rebuild from the same spec gets the same base (what a real run has with hub weights).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from utune import _fs as fs
from utune.cli import app
from utune.engine.build import build
from utune.errors import CheckpointError, ExportError, UserInputError
from utune.export import (
    export_merged,
    export_tuners,
    load_tuners,
    merged_state_dict,
    peft_adapter,
    tuner_state,
)
from utune.export.merge import forward_eval, verify_merged
from utune.graph.manifest import Tap
from utune.runs import load_run
from utune.spec import load_spec_text, spec_to_yaml
from utune.train.checkpoint import WEIGHTS, save_checkpoint, trainable_state

K = 5  # classes


def train_steps(built: Any, steps: int = 3, lr: float = 1e-2, seed: int = 1) -> None:
    """A few real AdamW steps on random data, so every tuner is far from its identity init."""
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, *built.input_size, generator=gen)
        y = torch.randint(0, K, (4,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def spec(name: str, tuners: list[dict], trainable: list[str], img: int = 32, **model: Any) -> dict:
    return {"version": 1, "model": {"name": name, "num_classes": K, "img_size": img, **model}, "tuners": tuners,
            "trainable": trainable}  # fmt: skip


def first(layers: str) -> dict:
    return {"layers": layers}


# ---- merged == unmerged ------------------------------------------------------------------------------------

VIT = {"img_size": 32}
CASES: dict[str, dict] = {
    # ia3 before lora on the same qkv (they fold in graph order), slices on both, a composite site (mlp ->
    # fc2 through Dropout), a norm, a conv LoRA, and linear adapters (act: identity) beside and after a layer
    "vit_stack": spec(
        "test_vit",
        [
            {"name": "ia3", "kind": "ia3", "at": {"path": "blocks.*.attn.qkv", **first("0-1")}, "slices": ["k", "v"]},
            {
                "name": "lora",
                "kind": "lora",
                "at": {"path": "blocks.*.attn.qkv", **first("0-1")},
                "rank": 2,
                "alpha": 4,
                "slices": ["q", "v"],
            },
            {"name": "bias", "kind": "bias", "at": {"path": "blocks.*.norm1", **first("0-1")}},
            {"name": "embed", "kind": "lora", "at": "patch_embed.proj", "rank": 3},  # Conv2d LoRA, 16x16 kernel
            {"name": "ssf_mlp", "kind": "ssf", "at": "blocks.1.mlp"},
            {"name": "ssf_fc2", "kind": "ssf", "at": "blocks.1.mlp.fc2"},
            {"name": "side", "kind": "adapter", "at": "blocks.0.attn.proj", "act": "identity", "dim": 4},
            {
                "name": "after",
                "kind": "adapter",
                "at": "blocks.0.mlp.fc1",
                "act": "identity",
                "dim": 4,
                "placement": "sequential",
                "scale": "scalar",
            },
        ],
        ["head"],
        kwargs=VIT,
    ),  # fmt: skip
    "resnet": spec(
        "test_resnet",
        [
            {"name": "lora", "kind": "lora", "at": "layer*.0.conv1", "rank": 2},
            {"name": "ssf", "kind": "ssf", "at": "layer*.0.bn1"},
            {"name": "ia3", "kind": "ia3", "at": "layer1.0.conv2"},
            {"name": "bias", "kind": "bias", "at": "layer1.0.bn2"},
        ],
        ["fc"],
        kwargs={"zero_init_last": False},  # timm zeroes each block's last BN: no gradient would reach the tuners
    ),
    "convnext": spec(
        "test_convnext",
        [
            {"name": "lora", "kind": "lora", "at": "stages.*.blocks.0.mlp.fc1", "rank": 2},  # Linear on NHWC
            {"name": "ssf", "kind": "ssf", "at": "stages.*.blocks.0.conv_dw"},  # depthwise conv
            {"name": "ia3", "kind": "ia3", "at": "stages.*.blocks.0.norm"},  # LayerNorm, channels last
            {"name": "down", "kind": "ssf", "at": "stages.1.downsample.0"},  # LayerNorm2d, channels first
        ],
        ["head.fc"],
    ),
    "torchvision_resnet18": spec(
        "torchvision:resnet18",
        [
            {"name": "lora", "kind": "lora", "at": "layer1.0.conv1", "rank": 2},
            {"name": "ssf", "kind": "ssf", "at": "layer1.0.bn1"},
            {"name": "bias", "kind": "bias", "at": "fc"},
        ],
        ["fc"],
    ),
}


def plain(name: str, kwargs: dict) -> torch.nn.Module:
    """The backbone as its own library makes it: what a user of the merged file does."""
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=K, **kwargs)
    return timm.create_model(name, pretrained=False, num_classes=K, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged_after_training(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    built = build(CASES[case])
    constant = {
        n: p.clone() for n, p in built.model.named_parameters() if n.startswith("utune.") and p.unique().numel() == 1
    }
    train_steps(built)
    assert constant, "no identity-at-init tuner parameters?"
    params = dict(built.model.named_parameters())
    stuck = [n for n, p in constant.items() if torch.equal(params[n], p)]
    assert not stuck, f"tuner parameters still at their init (no gradient reached them): {stuck}"
    live = {n: t.clone() for n, t in built.model.state_dict().items()}

    out = tmp_path / "merged.safetensors"
    result = export_merged(built, out)
    assert result["folds"] == sum(len(v) for v in built.tuner_modules.values())
    assert result["verify"].ok
    assert all(torch.equal(live[n], t) for n, t in built.model.state_dict().items()), "the live model changed"

    model = plain(CASES[case]["model"]["name"], CASES[case]["model"].get("kwargs", {}))
    model.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(3, *built.input_size, generator=torch.Generator().manual_seed(7))
    tuned, merged = forward_eval(built.model, x), forward_eval(model, x)
    scale = float(tuned.abs().max())
    assert float((tuned - merged).abs().max()) <= 1e-5 * scale
    # the tuners matter: dropping them (the base weights alone) gives another output
    base_only = plain(CASES[case]["model"]["name"], CASES[case]["model"].get("kwargs", {}))
    base_only.load_state_dict(built.base.state_dict(), strict=True)
    assert float((tuned - forward_eval(base_only, x)).abs().max()) > 1e-3 * scale


ALL_BN = [{"name": "ssf", "kind": "ssf", "at": {"type": "BatchNorm2d"}, "init_std": 0.1}]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {}), ("test_resnet", {"zero_init_last": False}), ("torchvision:resnet18", {})],
)
def test_ssf_on_every_batchnorm_of_a_resnet_merges(name: str, kwargs: dict) -> None:
    # the residual `out + downsample(x)` with an SSF on the downsample BN is no add-join: the rewriter's
    # record says the SSF replaces that BN's output, and it folds into that BN
    torch.manual_seed(0)
    built = build(spec(name, ALL_BN, ["fc"], kwargs=kwargs))
    train_steps(built)
    result = merged_state_dict(built)
    sites = list(built.report["tuners"][0]["sites"])
    assert any("downsample" in s for s in sites)
    assert [f[2] for f in result.folds] == sites and [f[3] for f in result.folds] == sites  # each into its own BN
    check = verify_merged(built, result.state)
    assert check.ok, check.line()


def test_the_manifest_records_how_each_tuner_was_attached() -> None:
    built = build(CASES["vit_stack"])
    by_module = {e.module: e for e in built.manifest}
    assert list(by_module) == [m for names in built.tuner_modules.values() for m in names]
    qkv = "blocks.0.attn.qkv"
    ia3, lora = by_module["utune.ia3.blocks_0_attn_qkv"], by_module["utune.lora.blocks_0_attn_qkv"]
    assert (ia3.rule, ia3.site, ia3.join, ia3.tap) == ("ia3", qkv, "replace", Tap("output"))
    assert ia3.nodes["call"] is ia3.nodes["joined"] and str(ia3.nodes["onto"].target) == qkv
    assert (lora.join, lora.tap) == ("add", Tap("input"))
    assert lora.nodes["onto"] is ia3.nodes["joined"]  # rules stack on one site in spec order: LoRA adds onto IA3
    assert lora.nodes["joined"].args == (lora.nodes["onto"], lora.nodes["call"])
    after = by_module["utune.after.blocks_0_mlp_fc1"]
    assert (after.join, after.tap) == ("add", Tap("output")) and after.nodes["call"].args == (after.nodes["onto"],)
    other = build(
        spec(
            "test_vit",
            [
                {"name": "pre", "kind": "prefix", "at": "blocks.1.attn", "placement": "concat", "length": 2},
                {"name": "vpt", "kind": "prompt", "at": "blocks.0", "length": 2},
            ],
            ["head"],
            kwargs=VIT,
        )
    )
    pre, vpt, drop = other.manifest
    assert (pre.join, pre.inputs) == ("kv_concat", ()) and str(pre.nodes["call"].target) == "utune.pre.blocks_1_attn"
    assert (vpt.join, vpt.tap) == ("replace_input", Tap("input")) and vpt.nodes["call"].args == (vpt.nodes["onto"],)
    n = len(other.report["tuners"][1]["sites"])  # VPT-shallow: one block; the tokens go after the last block
    assert n == 1 and (drop.site, drop.role, drop.join, drop.params) == ("blocks.5", "drop", "replace", 0)


def test_merge_needs_the_record_of_the_attachments() -> None:
    built = build(spec("test_resnet", [{"name": "ssf", "kind": "ssf", "at": "layer1.0.bn1"}], ["fc"]))
    built.manifest.entries[0].nodes.clear()
    with pytest.raises(ExportError, match=r"ssf \(ssf\) at layer1.0.bn1: there is no record of how it was attached"):
        merged_state_dict(built)


def test_non_mergeable_tuners_are_refused_with_the_list() -> None:
    built = build(
        spec(
            "test_vit",
            [
                {"name": "lora", "kind": "lora", "at": "blocks.0.attn.qkv"},
                {"name": "mha", "kind": "adapter", "at": "blocks.0.attn", "tap": "parent.input"},
                {"name": "pre", "kind": "prefix", "at": "blocks.1.attn", "placement": "concat", "length": 2},
                {"name": "ffn", "kind": "adapter", "at": "blocks.1.mlp.fc2"},  # gelu: not linear
            ],
            ["head"],
            kwargs=VIT,
        )
    )
    with pytest.raises(ExportError) as e:
        merged_state_dict(built)
    msg = str(e.value)
    assert "mha (adapter)" in msg and "pre (prefix)" in msg and "ffn (adapter)" in msg and "lora (lora)" not in msg
    assert "GELU" in msg and "--tuners-only" in msg
    assert e.value.exit_code == 2


def test_shift_on_a_layer_without_bias_and_non_layer_sites_are_refused() -> None:
    built = build(
        spec(
            "test_vit",
            [
                {"name": "qkv_bias", "kind": "bias", "at": "blocks.0.attn.qkv"},  # qkv has no bias here
                {"name": "qkv_ia3", "kind": "ia3", "at": "blocks.1.attn.qkv"},  # a scale alone folds
                {"name": "block", "kind": "ssf", "at": "blocks.1"},  # ends in a residual add
            ],
            ["head"],
            kwargs={**VIT, "qkv_bias": False},
        )
    )
    train_steps(built)
    with pytest.raises(ExportError) as e:
        merged_state_dict(built)
    msg = str(e.value)
    assert "qkv_bias (bias)" in msg and "has no bias to hold the shift" in msg
    assert "block (ssf)" in msg and "add" in msg and "qkv_ia3" not in msg
    assert "sum of two branches (the add in blocks.1)" in msg
    assert not any(w in msg for w in ("call_function", "call_module", "call_method", "placeholder")), msg


def test_norm_with_a_fused_activation_is_refused() -> None:
    built = build(
        spec(
            "test_efficientnet",
            [
                {"name": "stem", "kind": "ssf", "at": "bn1"},  # BatchNormAct2d: BN, then SiLU
                {"name": "pwl", "kind": "ssf", "at": "blocks.1.0.bn2"},  # BatchNormAct2d with act Identity: folds
            ],
            ["classifier"],
        )
    )
    train_steps(built)
    with pytest.raises(ExportError, match=r"stem \(ssf\).*applies SiLU") as e:
        merged_state_dict(built)
    assert "pwl" not in str(e.value)


def test_peft_format_refusals_need_no_peft() -> None:
    built = build(
        spec(
            "test_vit",
            [
                {"name": "qv", "kind": "lora", "at": "blocks.0.attn.qkv", "slices": ["q", "v"]},
                {"name": "ssf", "kind": "ssf", "at": "blocks.0.norm1"},
            ],
            ["norm"],  # PEFT picks modules_to_save by name suffix: 'norm' would also pick fc_norm, q_norm...
            kwargs=VIT,
        )
    )
    with pytest.raises(ExportError) as e:
        peft_adapter(built)
    msg = str(e.value)
    assert "ssf (ssf)" in msg and "would also pick" in msg
    assert "qv (lora)" not in msg  # a q/v-sliced LoRA is one PEFT LoRA on the fused qkv


# ---- tuner-only files --------------------------------------------------------------------------------------


def base_file(path: Path, name: str, seed: int, **kwargs: Any) -> Path:
    torch.manual_seed(seed)
    save_file(timm.create_model(name, pretrained=False, num_classes=K, **kwargs).state_dict(), str(path))
    return path


def vit_spec(base: Path, rank: int = 2, name: str = "test_vit") -> dict:
    return spec(
        name,
        [
            {"name": "lora", "kind": "lora", "at": {"path": "blocks.*.attn.qkv", **first("0-1")}, "rank": rank,
             "slices": ["q", "v"]},
            {"name": "ssf", "kind": "ssf", "at": "blocks.0.mlp.fc1"},
            {"name": "mha", "kind": "adapter", "at": "blocks.1.attn", "tap": "parent.input", "dim": 4},
        ],
        ["head"],
        kwargs=VIT,
        pretrained=str(base),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained test_vit (LoRA, SSF and a non-mergeable adapter) on a base read from a file, exported."""
    d = tmp_path_factory.mktemp("tuners")
    base = base_file(d / "base.safetensors", "test_vit", 0, **VIT)
    built = build(vit_spec(base))
    train_steps(built)
    path = d / "tuners.safetensors"
    export_tuners(built, path)
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(3))
    return {"dir": d, "base": base, "built": built, "path": path, "x": x, "out": forward_eval(built.model, x)}


def test_tuner_file_round_trip_is_exact(trained: dict[str, Any]) -> None:
    fresh = build(vit_spec(trained["base"]))
    assert not torch.equal(forward_eval(fresh.model, trained["x"]), trained["out"])
    info = load_tuners(fresh, trained["path"])
    assert torch.equal(forward_eval(fresh.model, trained["x"]), trained["out"])
    assert info["base_model"] == "test_vit"


def test_tuner_file_keys_and_metadata(trained: dict[str, Any]) -> None:
    with safe_open(str(trained["path"]), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora/blocks.0.attn.qkv/branches.q.lora_A.weight" in keys
    assert "ssf/blocks.0.mlp.fc1/scale" in keys and "mha/blocks.1.attn/down.weight" in keys
    assert {"head.weight", "head.bias"} <= keys
    assert not any(k.startswith("utune.") for k in keys)
    assert keys == set(tuner_state(trained["built"]))
    for field in ("utune.version", "utune.spec", "utune.spec_hash", "utune.base_model", "utune.base_fingerprint"):
        assert meta[field]
    assert load_spec_text(meta["utune.spec"]).tuners[0].name == "lora"
    assert json.loads(meta["utune.sites"])["lora/blocks.0.attn.qkv"]["module"] == "utune.lora.blocks_0_attn_qkv"
    assert len(trainable_state(trained["built"].model)) == len(keys)


def test_other_train_settings_still_load(trained: dict[str, Any]) -> None:
    s = vit_spec(trained["base"])
    s["train"] = {"lr": 0.5, "max_steps": 7}  # not part of what the tuners depend on
    load_tuners(build(s), trained["path"])


def test_mismatched_base_weights_are_refused(trained: dict[str, Any]) -> None:
    other = base_file(trained["dir"] / "other.safetensors", "test_vit", 1, **VIT)
    built = build(vit_spec(other))
    with pytest.raises(CheckpointError, match="other base weights") as e:
        load_tuners(built, trained["path"])
    assert e.value.exit_code == 2
    load_tuners(built, trained["path"], check_base=False)  # the explicit escape hatch


def test_mismatched_base_model_is_refused(trained: dict[str, Any]) -> None:
    base2 = base_file(trained["dir"] / "vit2.safetensors", "test_vit2", 0, **VIT)
    with pytest.raises(CheckpointError, match="holds tuners for 'test_vit'"):
        load_tuners(build(vit_spec(base2, name="test_vit2")), trained["path"])


def test_mismatched_spec_is_refused_with_the_difference(trained: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError, match=r"rule 'lora': rank = 2 in the file, 4 in the spec"):
        load_tuners(build(vit_spec(trained["base"], rank=4)), trained["path"])


def test_damaged_tuner_files_are_refused(trained: dict[str, Any], tmp_path: Path) -> None:
    data = trained["path"].read_bytes()
    built = trained["built"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tuners(built, cut)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # damage tensor bytes, not the header
    with pytest.raises(CheckpointError, match="checksum"):
        load_tuners(built, flipped)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a utune tuner file"):
        load_tuners(built, foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tuners(built, tmp_path / "missing.safetensors")


# ---- writing safely ----------------------------------------------------------------------------------------


def test_existing_output_is_not_overwritten_without_force(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match=str(out)) as e:
        export_tuners(trained["built"], out)
    assert e.value.exit_code == 2 and out.read_bytes() == b"keep me"
    export_tuners(trained["built"], out, force=True)
    assert set(load_file(str(out))) == set(tuner_state(trained["built"]))


def test_full_disk_leaves_no_partial_file(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any) -> None:
        os.write(fd, bytes(data[:10]))  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_all", full)  # the one atomic writer (utune._fs) every export goes through
    out = tmp_path / "t.safetensors"
    with pytest.raises(ExportError, match="no space left"):
        export_tuners(trained["built"], out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    with pytest.raises(ExportError, match="no space left"):
        export_tuners(trained["built"], out, force=True)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


# ---- from a run directory, and the CLI ----------------------------------------------------------------------


def make_run(root: Path, built: Any, name: str = "run") -> Path:
    """A run directory as `utune apply --train` leaves it: spec.yaml and a checkpoint."""
    run = root / name
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(spec_to_yaml(built.spec))
    save_checkpoint(run / "checkpoints", step=3, weights=trainable_state(built.model), state={"step": 3})
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained, fully mergeable test_vit run on a base read from a file."""
    d = tmp_path_factory.mktemp("run")
    base = base_file(d / "base.safetensors", "test_vit", 0, **VIT)
    s = spec(
        "test_vit",
        [{"name": "lora", "kind": "lora", "at": "blocks.0.attn.qkv", "slices": ["q", "v"], "rank": 2},
         {"name": "ssf", "kind": "ssf", "at": "blocks.1.mlp.fc1"}],
        ["head"],
        kwargs=VIT,
        pretrained=str(base),
    )  # fmt: skip
    built = build(s)
    train_steps(built)
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(3))
    return {"run": make_run(d / "runs", built), "out": forward_eval(built.model, x), "x": x, "spec": s}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_load_run_reproduces_the_trained_model(run_dir: dict[str, Any]) -> None:
    built = load_run(run_dir["run"])
    assert torch.equal(forward_eval(built.model, run_dir["x"]), run_dir["out"])


def test_cli_merge_then_refuses_to_overwrite(run_dir: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    r = invoke("export", run_dir["run"], "--merge", "-o", out)
    assert r.exit_code == 0, r.output
    assert "verify: max |merged - tuned|" in r.output and "wrote merged weights" in r.output
    model = plain("test_vit", VIT)
    model.load_state_dict(load_file(str(out)), strict=True)
    assert torch.allclose(forward_eval(model, run_dir["x"]), run_dir["out"], atol=1e-5 * run_dir["out"].abs().max())
    r = invoke("export", run_dir["run"], "--merge", "-o", out)
    assert isinstance(r.exception, ExportError) and r.exception.exit_code == 2
    assert str(out) in r.exception.message and "--force" in (r.exception.hint or "")
    r = invoke("export", run_dir["run"], "--merge", "-o", out, "--force", "--no-verify", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.output)["mode"] == "merge"


def test_cli_tuners_only_from_the_latest_run_and_merge_from_a_spec(
    run_dir: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(run_dir["run"].parent.parent)  # runs/ is under here: the latest run is the default
    r = invoke("export", "--tuners-only")
    assert r.exit_code == 0, r.output
    tuners = run_dir["run"] / "export" / "tuners.safetensors"
    assert tuners.is_file()
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec_to_yaml(load_spec_text(json.dumps(run_dir["spec"]))))
    out = tmp_path / "m.safetensors"
    r = invoke("export", spec_file, "--tuners", tuners, "--merge", "-o", out)
    assert r.exit_code == 0, r.output
    model = plain("test_vit", VIT)
    model.load_state_dict(load_file(str(out)), strict=True)
    assert torch.allclose(forward_eval(model, run_dir["x"]), run_dir["out"], atol=1e-5 * run_dir["out"].abs().max())


def test_cli_errors(run_dir: dict[str, Any], tmp_path: Path) -> None:
    r = invoke("export", run_dir["run"], "--merge", "--tuners-only")
    assert isinstance(r.exception, UserInputError) and r.exception.exit_code == 2
    r = invoke("export", tmp_path, "--merge", "-o", tmp_path / "x.safetensors")
    assert isinstance(r.exception, CheckpointError) and "no spec.yaml" in r.exception.message
    broken = tmp_path / "broken"
    shutil.copytree(run_dir["run"], broken)
    weights = next((broken / "checkpoints").glob(f"step-*/{WEIGHTS}"))
    weights.write_bytes(weights.read_bytes()[:50])
    r = invoke("export", broken, "--merge", "-o", tmp_path / "y.safetensors")
    assert isinstance(r.exception, CheckpointError) and "corrupt or truncated" in r.exception.message


def test_cli_refuses_non_mergeable_run(tmp_path: Path) -> None:
    base = base_file(tmp_path / "base.safetensors", "test_vit", 0, **VIT)
    built = build(
        spec("test_vit", [{"name": "pre", "kind": "prefix", "at": "blocks.0.attn", "placement": "concat",
                           "length": 2}], ["head"], kwargs=VIT, pretrained=str(base))
    )  # fmt: skip
    run = make_run(tmp_path / "runs", built)
    out = tmp_path / "m.safetensors"
    r = invoke("export", run, "--merge", "-o", out)
    assert isinstance(r.exception, ExportError) and r.exception.exit_code == 2
    assert "pre (prefix)" in r.exception.message and "--tuners-only" in (r.exception.hint or "")
    assert not out.exists()

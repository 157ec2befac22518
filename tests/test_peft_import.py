"""PEFT adapter folders into utune: a LoRA (with per-layer ranks) and an IA3 adapter trained by PEFT on a tiny
timm model compute in utune what they compute in PEFT; utune -> PEFT -> utune gives back the same tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

import utune  # noqa: E402
from utune.errors import ExportError, UserInputError  # noqa: E402
from utune.export import export_peft, load_tuners  # noqa: E402
from utune.runs import import_peft  # noqa: E402
from utune.train.checkpoint import trainable_state  # noqa: E402

MODEL = {"name": "test_vit", "num_classes": 5, "img_size": 32}
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def base_file(tmp: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=5, img_size=32)
    path = tmp / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def peft_model(base: Path, config: Any) -> Any:
    model = timm.create_model("test_vit", num_classes=5, img_size=32)
    model.load_state_dict(load_file(str(base)))
    pm = peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # trained, so every tensor is far from its init
        loss = F.cross_entropy(pm(torch.randn(4, 3, 32, 32, generator=gen)), torch.randint(0, 5, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


def imported(tmp: Path, folder: Path, base: Path) -> Any:
    result = import_peft(folder, {**MODEL, "pretrained": str(base)}, tmp / "t.safetensors")
    built = utune.build(result["spec"])
    load_tuners(built, result["path"])
    return result, built.model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_a_peft_lora_with_per_layer_ranks_imports_exactly(tmp_path: Path) -> None:
    base = base_file(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"],
                          rank_pattern={"fc1": 2}, alpha_pattern={"fc1": 6})  # fmt: skip
    pm = peft_model(base, cfg)
    pm.save_pretrained(str(tmp_path / "peft"))
    result, model = imported(tmp_path, tmp_path / "peft", base)
    assert result["rules"] == ["lora", "lora_2"] and result["verify"].ok
    spec = utune.load_spec(result["spec"])
    assert {(r.options.rank, r.options.alpha) for r in spec.tuners} == {(2, 6.0), (4, 8.0)}  # scaling 3 and 2
    assert spec.trainable == ["head"]
    with torch.no_grad():
        assert close(model(X), pm(X))


def test_a_peft_ia3_with_feedforward_layers_imports_exactly(tmp_path: Path) -> None:
    base = base_file(tmp_path)
    pm = peft_model(base, peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"]))
    pm.save_pretrained(str(tmp_path / "ia3"))
    result, model = imported(tmp_path, tmp_path / "ia3", base)
    spec = utune.load_spec(result["spec"])
    assert [(r.name, r.tap) for r in spec.tuners] == [("ia3", None), ("ia3_input", "input")]
    with torch.no_grad():
        assert close(model(X), pm(X))


def test_utune_to_peft_to_utune_is_lossless(tmp_path: Path) -> None:
    base = base_file(tmp_path)
    spec = {"version": 1, "model": {**MODEL, "pretrained": str(base)}, "trainable": ["head"],
            "tuners": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4, "alpha": 8}]}  # fmt: skip
    built = utune.build(spec)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    export_peft(built, tmp_path / "peft")
    result, model = imported(tmp_path, tmp_path / "peft", base)
    again = utune.build(result["spec"])
    load_tuners(again, result["path"])
    before = {k.split(".", 2)[-1]: v for k, v in trainable_state(built.model).items()}
    after = {k.split(".", 2)[-1]: v for k, v in trainable_state(again.model).items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(X), built.model.eval()(X))


def test_what_cannot_be_imported_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a PEFT adapter folder"):
        import_peft(tmp_path, MODEL, tmp_path / "t.safetensors")
    base = base_file(tmp_path)
    pm = peft_model(base, peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True))
    pm.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ExportError, match="it is DoRA"):
        import_peft(tmp_path / "dora", MODEL, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True


def test_import_peft_takes_the_model_from_a_spec_on_the_command_line(tmp_path: Path) -> None:
    """``utune import-peft FOLDER --spec SPEC`` as typed: the model section (weights, classes, size) comes from
    the spec, stdout is one JSON document, and the import's comparison with PEFT's model passes."""
    import subprocess
    import sys

    import yaml

    base = base_file(tmp_path)
    spec = {"version": 1, "model": {**MODEL, "pretrained": "base.safetensors"}, "trainable": ["head"],
            "tuners": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4}]}  # fmt: skip
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(spec))
    built = utune.build(utune.load_spec(tmp_path / "lora.yaml"))
    export_peft(built, tmp_path / "peft")
    cmd = [sys.executable, "-m", "utune", "import-peft", "peft", "--spec", "lora.yaml", "-o", "t.safetensors"]
    proc = subprocess.run([*cmd, "--format", "json"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["verify"]["ok"] is True and (tmp_path / "t.safetensors").is_file()
    model = utune.load_spec(tmp_path / "t.yaml").model
    assert (model.name, model.num_classes, Path(str(model.pretrained)).resolve()) == ("test_vit", 5, base.resolve())
    neither = subprocess.run(cmd[:5] + ["-o", "u.safetensors"], cwd=tmp_path, capture_output=True, text=True)
    assert neither.returncode == 2 and "--model NAME or --spec SPEC" in neither.stderr
    assert "Traceback" not in neither.stderr and not (tmp_path / "u.safetensors").exists()

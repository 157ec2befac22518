"""The PEFT-style operations of a tuned model: disable_tuners, merge_and_unload, print_trainable_parameters,
load_tuners (from a tuner-only file and from a run folder)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import utune
from utune.errors import CheckpointError, ExportError, TunedModelError
from utune.export import export_tuners
from utune.train.checkpoint import save_checkpoint, trainable_state

VIT = {"name": "test_vit", "num_classes": 5, "img_size": 32}
RESNET = {"name": "test_resnet", "num_classes": 5, "img_size": 32}


def spec(model: dict[str, Any], tuners: list[dict[str, Any]], trainable: list[str]) -> dict[str, Any]:
    return {"version": 1, "model": model, "tuners": tuners, "trainable": trainable}


LORA = spec(VIT, [{"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4}], ["head"])
MIXED = spec(RESNET, [{"name": "ssf", "kind": "ssf", "at": {"type": "BatchNorm2d"}},
                      {"name": "ad", "kind": "adapter", "at": "layer*.*"}], ["fc"])  # fmt: skip


def train(built: Any, steps: int = 3) -> None:
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("s", [LORA, MIXED], ids=["vit_lora", "resnet_ssf_adapter"])
def test_disable_tuners_gives_the_base_models_output_bit_exactly(s: dict[str, Any]) -> None:
    built = utune.build(s)
    train(built)
    model = built.model.eval()
    tuned = model(X)
    with model.disable_tuners():
        off = model(X)
        with model.disable_tuners():  # nests
            assert torch.equal(model(X), off)
    assert torch.equal(off, built.base.eval()(X)) and not torch.equal(off, tuned)
    assert torch.equal(model(X), tuned)  # on again after the block
    model.train()
    with model.disable_tuners():  # in train mode too (BatchNorm of the frozen backbone: its mode is kept)
        model(X)


def test_merge_and_unload_is_the_plain_model_with_the_tuners_folded() -> None:
    built = utune.build(LORA)
    train(built)
    plain = built.model.eval().merge_and_unload().eval()
    assert type(plain).__name__ == "VisionTransformer" and not any("utune" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        diff, scale = float((plain(X) - built.model(X)).abs().max()), float(built.model(X).abs().max())
    assert diff <= 1e-5 * scale
    with pytest.raises(ExportError, match=r"ad \(adapter\)"):  # a GELU adapter cannot fold: named
        utune.build(MIXED).model.merge_and_unload()


def test_a_copied_or_unpickled_model_merges_and_loads_as_the_original() -> None:
    """The tuned model carries its build record as data (no pointer back to the build): a deep copy and a
    pickled round trip merge to the same plain model, and load tuners, independently of the original."""
    built = utune.build(LORA)
    train(built)
    with torch.no_grad():
        ref = built.model.eval()(X)
        for other in (copy.deepcopy(built.model), pickle.loads(pickle.dumps(built.model))):
            plain = other.eval().merge_and_unload().eval()
            assert type(plain).__name__ == "VisionTransformer"
            assert float((plain(X) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    copied = copy.deepcopy(built.model)
    mine = {id(n) for n in copied.graph.nodes}
    from utune.engine.tuned_ops import built_of

    assert all(id(n) in mine for e in built_of(copied).manifest for n in e.nodes.values())  # the copy's own nodes
    with torch.no_grad():  # the copy's tuners are its own: changing them leaves the original's merge alone
        for p in copied.parameters():
            if p.requires_grad:
                p.zero_()
        plain = built.model.merge_and_unload().eval()
        assert float((plain(X) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    from utune.engine.tuned_ops import RECORD

    del copied.__dict__[RECORD]  # a model without a build record (not made by utune.build) says so
    with pytest.raises(TunedModelError, match="made by utune.build"):
        copied.merge_and_unload()


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    built = utune.build(LORA)
    built.model.print_trainable_parameters()
    t, n = built.report["trainable_params"], built.report["total_params"]
    assert capsys.readouterr().out == f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}\n"


def test_load_tuners_from_a_file_and_from_a_run_folder(tmp_path: Path) -> None:
    trained = utune.build(LORA)
    train(trained)
    want = trained.model.eval()(X)
    export_tuners(trained, tmp_path / "t.safetensors")
    fresh = utune.build(LORA)
    fresh.model.load_tuners(tmp_path / "t.safetensors")
    assert torch.equal(fresh.model.eval()(X), want)
    run = tmp_path / "run"
    run.mkdir()
    from utune.spec import spec_to_yaml

    (run / "spec.yaml").write_text(spec_to_yaml(utune.load_spec(LORA)))
    from utune.train.checkpoint import frozen_fingerprint

    save_checkpoint(run / "checkpoints", step=1, weights=trainable_state(trained.model),
                    state={"step": 1, "frozen": frozen_fingerprint(trained.model)})  # fmt: skip
    again = utune.build(LORA)
    again.model.load_tuners(run)
    assert torch.equal(again.model.eval()(X), want)
    other = utune.build(spec(VIT, [{"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 2}], ["head"]))
    with pytest.raises(CheckpointError, match="trained with another spec: rule 'lo': rank = 4 in the file, 2"):
        other.model.load_tuners(run)

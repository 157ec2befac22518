"""Tensors shared across a rule's sites (``share:``): one tensor that trains, saves, exports and counts once
and folds into every layer that uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from utune.engine.build import Built, build
from utune.errors import RewriteError, SelectionError
from utune.export import export_tuners, load_tuners, merged_state_dict
from utune.export.merge import forward_eval, plain_model
from utune.train.checkpoint import trainable_state

A = "branch.lora_A.weight"


def spec(share: Any, at: Any = "blocks.*.attn.qkv") -> dict[str, Any]:
    rule = {"name": "lo", "kind": "lora", "at": at, "rank": 4, "share": share}
    return {"version": 1, "model": {"name": "test_vit", "num_classes": 5, "img_size": 32}, "tuners": [rule],
            "trainable": ["head"]}  # fmt: skip


def steps(built: Built, n: int = 3) -> None:
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        x, y = torch.randn(4, *built.input_size, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def shared_tensors(built: Built) -> list[torch.Tensor]:
    """Each site's A (a parameter, or a buffer when frozen)."""
    out = []
    for m in built.tuner_modules["lo"]:
        owner = built.model.get_submodule(f"{m}.branch.lora_A")
        param = owner._parameters.get("weight")
        out.append(param if param is not None else owner._buffers["weight"])
    return out


def test_a_shared_tensor_is_one_tensor_that_trains_and_saves_once(tmp_path: Path) -> None:
    built = build(spec([A]))
    sites = built.tuner_modules["lo"]
    tensors = shared_tensors(built)
    assert len(sites) > 1 and all(t is tensors[0] for t in tensors)
    rank, c = 4, 64
    assert built.report["tuners"][0]["params"] == rank * c + len(sites) * 3 * c * rank  # A once, B per site
    before = tensors[0].detach().clone()
    steps(built)
    assert not torch.equal(before, tensors[0])  # one gradient from every site moved it
    state = trainable_state(built.model)
    assert sum(k.endswith(A) for k in state) == 1
    path = tmp_path / "t.safetensors"
    export_tuners(built, path)
    with safe_open(str(path), "pt") as f:
        assert sum(k.endswith(A) for k in f.keys()) == 1
    fresh = build(spec([A]))
    load_tuners(fresh, path)
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(forward_eval(fresh.model, x), forward_eval(built.model, x))  # the tie survives the load
    assert all(t is shared_tensors(fresh)[0] for t in shared_tensors(fresh))


def test_a_shared_tensor_folds_into_every_layer() -> None:
    built = build(spec([A]))
    steps(built)
    result = merged_state_dict(built)
    assert len(result.folds) == len(built.tuner_modules["lo"])
    plain = plain_model(built)
    plain.load_state_dict(result.state, strict=True)
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(2))
    tuned, merged = forward_eval(built.model, x), forward_eval(plain, x)
    assert float((tuned - merged).abs().max()) <= 1e-5 * float(tuned.abs().max())


def test_a_frozen_shared_tensor_is_a_buffer_that_does_not_train() -> None:
    built = build(spec({"tensors": [A], "trainable": False}))
    tensors = shared_tensors(built)
    assert all(t is tensors[0] for t in tensors) and not tensors[0].requires_grad
    before = tensors[0].clone()
    steps(built)
    assert torch.equal(before, tensors[0])
    assert sum(k.endswith(A) for k in trainable_state(built.model)) == 1  # still saved, once
    assert built.report["tuners"][0]["params"] == len(built.tuner_modules["lo"]) * 3 * 64 * 4


def test_share_errors_name_the_tensors() -> None:
    with pytest.raises(SelectionError, match="`share` names lora_A.weight") as e:
        build(spec(["lora_A.weight"]))
    assert A in (e.value.hint or "")
    with pytest.raises(RewriteError, match="shared tensor branch.lora_B.weight is"):
        build(spec(["branch.lora_B.weight"], at=["blocks.*.attn.qkv", "blocks.*.mlp.fc2"]))  # 192 vs 64 outputs

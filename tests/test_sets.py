"""Named tuner sets on one backbone (utune.build_sets): each set behaves as its own build, the frozen
weights are in memory once, training one set leaves the others alone, and forward_sets computes what no
set's tuners reach once for all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import utune
from utune.errors import CheckpointError, UserInputError
from utune.export import export_tuners


def spec(classes: int, tuners: list[dict[str, Any]], trainable: list[str]) -> dict[str, Any]:
    return {
        "version": 1,
        "model": {"name": "test_vit", "num_classes": classes, "img_size": 32},
        "tuners": tuners,
        "trainable": trainable,
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local "pre-trained" backbone: with random weights, another class count draws another backbone."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("w") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), str(path))
    return str(path)


def on(s: dict[str, Any], weights: str) -> dict[str, Any]:
    return s | {"model": s["model"] | {"pretrained": weights}}


LORA = spec(5, [{"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4}], ["head"])
ADAPT = spec(3, [{"name": "ad", "kind": "adapter", "at": "blocks.*.mlp", "dim": 4}], ["head"])
BYPASS_A = spec(5, [{"name": "by", "kind": "bypass", "at": "blocks.*", "dim": 4, "into": "norm"}], ["head"])
BYPASS_B = spec(7, [{"name": "by", "kind": "bypass", "at": "blocks.*", "dim": 6, "into": "norm"}], ["head"])


def perturb(built: Any, seed: int) -> None:
    """Stand-in for training: every trainable tensor moves, so a set's output depends on its own tensors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_sets_from_tuner_files_equal_their_own_builds(tmp_path: Path, x: torch.Tensor, weights: str) -> None:
    alone = {}
    for i, (name, s) in enumerate({"cifar": LORA, "flowers": ADAPT}.items()):
        built = utune.build(on(s, weights))
        perturb(built, i)
        export_tuners(built, tmp_path / f"{name}.safetensors")
        alone[name] = built.model.eval()

    sets = utune.build_sets({n: tmp_path / f"{n}.safetensors" for n in alone}).eval()
    with torch.no_grad():
        for name, model in alone.items():
            sets.set_active(name)
            torch.testing.assert_close(sets(x), model(x), rtol=0, atol=1e-6)
        both = sets.forward_sets(x)
        assert both["cifar"].shape == (2, 5) and both["flowers"].shape == (2, 3)
        for name, model in alone.items():
            torch.testing.assert_close(both[name], model(x), rtol=0, atol=1e-6)


def test_frozen_weights_are_stored_once_and_sets_train_apart(x: torch.Tensor) -> None:
    sets = utune.build_sets({"a": LORA, "b": ADAPT})
    a, b = sets.built["a"].model, sets.built["b"].model
    qkv = "blocks.0.attn.qkv.weight"
    assert dict(a.named_parameters())[qkv].data_ptr() == dict(b.named_parameters())[qkv].data_ptr()
    assert a.head is not b.head and a.head.out_features == 5 and b.head.out_features == 3

    backbone = sum(p.numel() for n, p in sets.built["a"].base.named_parameters() if not n.startswith("head."))
    trainable = sum(p.numel() for m in (a, b) for p in m.parameters() if p.requires_grad)
    assert sum(p.numel() for p in sets.parameters()) == backbone + trainable  # one copy of the backbone

    sets.eval()
    with torch.no_grad():
        before = sets.forward_sets(x)
    sets.set_active("a")
    opt = torch.optim.SGD([p for p in sets.parameters() if p.requires_grad], lr=0.5)
    sets(x).sum().backward()
    assert all(p.grad is None for p in b.parameters() if p.requires_grad)
    opt.step()
    with torch.no_grad():
        after = sets.forward_sets(x)
    assert not torch.allclose(after["a"], before["a"])
    torch.testing.assert_close(after["b"], before["b"], rtol=0, atol=0)


def test_bypass_sets_run_the_backbone_once(x: torch.Tensor) -> None:
    sets = utune.build_sets({"a": BYPASS_A, "b": BYPASS_B}).eval()
    for i, b in enumerate(sets.built.values()):
        perturb(b, i)
    calls: list[int] = []
    block = sets.built["a"].base.blocks[0].attn.qkv  # a leaf of the traced graph (blocks are traced through)
    assert block is sets.built["b"].model.get_submodule("blocks.0.attn.qkv")
    block.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        separate = {}
        for name in ("a", "b"):
            sets.set_active(name)
            separate[name] = sets(x)
        assert len(calls) == 2
        calls.clear()
        together = sets.forward_sets(x)
    assert len(calls) == 1  # the frozen backbone ran once for both side networks
    for name in separate:
        torch.testing.assert_close(together[name], separate[name], rtol=0, atol=1e-6)
    assert together["a"].shape == (2, 5) and together["b"].shape == (2, 7)


def test_multi_task_step_equals_one_step_per_task(tmp_path: Path, x: torch.Tensor, weights: str) -> None:
    """K bypass tasks from one backbone pass: the summed loss gives each set exactly its own loss's gradients,
    and each set still exports (and reloads) on its own."""
    bypass_c = spec(4, [{"name": "by", "kind": "bypass", "at": "blocks.*", "dim": 3, "into": "norm"}], ["head"])
    sets = utune.build_sets({n: on(s, weights) for n, s in {"a": BYPASS_A, "b": BYPASS_B, "c": bypass_c}.items()})
    sets.train()
    for i, b in enumerate(sets.built.values()):
        perturb(b, i)
    gen = torch.Generator().manual_seed(3)
    targets = {n: torch.randint(0, b.spec.model.num_classes, (2,), generator=gen) for n, b in sets.built.items()}
    separate = {}
    for name, built in sets.built.items():
        sets.set_active(name)
        sets.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(sets(x), targets[name]).backward()
        separate[name] = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
    sets.zero_grad(set_to_none=True)
    losses = sets.losses(x, targets)
    sum(losses.values()).backward()  # type: ignore[union-attr]
    for name, built in sets.built.items():
        for n, p in built.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, separate[name][n], rtol=1e-5, atol=1e-7)
    params = [p for p in sets.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    before = {n: b.model.state_dict()["head.weight"].clone() for n, b in sets.built.items()}
    out = sets.train_step(x, targets, opt)
    assert set(out) == set(targets) and all(v > 0 for v in out.values())
    for name, built in sets.built.items():
        assert not torch.equal(built.model.state_dict()["head.weight"], before[name])
        export_tuners(built, tmp_path / f"{name}.safetensors")
        alone = utune.build(built.spec)
        alone.model.load_tuners(tmp_path / f"{name}.safetensors")
        sets.set_active(name)
        with torch.no_grad():
            torch.testing.assert_close(alone.model.eval()(x), sets.eval()(x), rtol=0, atol=1e-6)
        sets.train()


def test_sets_for_another_backbone_or_unknown_names_are_refused() -> None:
    other = spec(5, LORA["tuners"], ["head"]) | {"model": {"name": "test_vit", "num_classes": 5, "img_size": 64}}
    with pytest.raises(UserInputError, match="model.img_size"):
        utune.build_sets({"a": LORA, "b": other})
    sets = utune.build_sets({"a": LORA})
    with pytest.raises(UserInputError, match="no tuner set named 'c'"):
        sets.set_active("c")
    with pytest.raises(UserInputError, match="at least one"):
        utune.build_sets({})


def test_a_tuner_file_for_other_base_weights_is_refused(tmp_path: Path, weights: str) -> None:
    export_tuners(utune.build(ADAPT), tmp_path / "b.safetensors")
    # random backbones with 5 and 3 classes differ (the head is drawn before the backbone's init)
    with pytest.raises(CheckpointError, match="other base weights"):
        utune.build_sets({"a": LORA, "b": tmp_path / "b.safetensors"})
    with pytest.raises(UserInputError, match="model.pretrained"):
        utune.build_sets({"a": LORA, "b": on(ADAPT, weights)})

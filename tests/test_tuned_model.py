"""The tuned model keeps the base model's public API: attributes, forward_features/forward_head computed by
the tuned graph (tuners included), reset_classifier, copies; and nothing else about the built model changes.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx

import utune.engine.build as api
from utune.engine.build import Built, build
from utune.engine.tuned import TunedModel
from utune.errors import TunedModelError, UnavailableAttributeError
from utune.graph.rewrite import TUNER_ROOT
from utune.train.checkpoint import trainable_state

K = 10  # classes
LORA_VIT = {"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4}
# name -> (model section, tuners, trainable)
CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]], list[str]]] = {
    "vit": ({"name": "test_vit"}, [LORA_VIT], ["head"]),
    "resnet": (
        {"name": "test_resnet", "img_size": 64},
        [{"name": "lo", "kind": "lora", "at": {"path": "layer*.**", "type": "Conv2d"}}],
        ["fc"],
    ),
    "convnext": (
        {"name": "test_convnext", "img_size": 64},
        [{"name": "lo", "kind": "lora", "at": "stem.0"}],  # not in a block: their layer scales start at 1e-6
        ["head.fc"],
    ),
    "tv_resnet": (
        {"name": "torchvision:resnet18", "img_size": 32},
        [{"name": "lo", "kind": "lora", "at": {"path": "layer1.**", "type": "Conv2d"}}],
        ["fc"],
    ),
    "tv_vit": (
        {"name": "torchvision:vit_b_16", "img_size": 32, "kwargs": {"image_size": 32}},
        [{"name": "lo", "kind": "lora", "at": "encoder.layers.*.mlp.0"}],
        ["heads"],
    ),
}
TIMM = ("vit", "resnet", "convnext")
# public attributes each base has, read through the tuned model
ATTRS = {
    "vit": ["pretrained_cfg", "default_cfg", "num_classes", "num_features", "embed_dim", "global_pool"],
    "resnet": ["pretrained_cfg", "default_cfg", "num_classes", "num_features", "feature_info"],
    "convnext": ["pretrained_cfg", "default_cfg", "num_classes", "num_features", "head_hidden_size"],
    "tv_resnet": ["inplanes", "groups", "base_width", "dilation"],
    "tv_vit": ["num_classes", "image_size", "patch_size", "hidden_dim", "representation_size"],
}


def spec(case: str, tuners: list[dict[str, Any]] | None = None, trainable: list[str] | None = None) -> dict:
    model, default_tuners, default_trainable = CASES[case]
    return {
        "version": 1,
        "model": {**model, "num_classes": K},
        "tuners": default_tuners if tuners is None else tuners,
        "trainable": default_trainable if trainable is None else trainable,
    }


def batch(built: Built, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *built.input_size, generator=torch.Generator().manual_seed(seed))


def train_steps(built: Built, steps: int = 3, lr: float = 1e-2, classes: int = K) -> None:
    """A few AdamW steps on random data, so every tuner is far from its init."""
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, *built.input_size, generator=gen)
        loss = F.cross_entropy(model(x), torch.randint(0, classes, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)


# ---- attributes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_base_attributes_are_read_through(case: str) -> None:
    built = build(spec(case))
    model, base = built.model, built.base
    assert isinstance(model, TunedModel) and isinstance(model, fx.GraphModule)
    assert type(model).__name__ == type(base).__name__
    for name in ATTRS[case]:
        assert hasattr(model, name), name
        assert getattr(model, name) == getattr(base, name), name
    assert set(ATTRS[case]) <= set(dir(model))
    if case in TIMM:
        assert model.get_classifier() is base.get_classifier()
        assert model.get_classifier() is model.get_submodule(built.spec.trainable[0])  # the graph's own head
    else:  # torchvision has no timm API, and the tuned model does not invent one
        for name in ("forward_features", "forward_head", "reset_classifier"):
            assert not hasattr(model, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        model.no_such_thing  # noqa: B018


def test_private_names_and_refused_methods_are_not_forwarded() -> None:
    built = build(spec("vit"))
    model = built.model
    assert hasattr(built.base, "_pos_embed") and not hasattr(model, "_pos_embed")
    # would run the untuned model: refused, with the reason, and absent for hasattr/getattr(default)
    assert not hasattr(model, "forward_intermediates")
    with pytest.raises(UnavailableAttributeError, match="untuned base model"):
        model.forward_intermediates  # noqa: B018
    # utune's optimizer decides weight decay without it: forwarding it would change training
    assert getattr(model, "no_weight_decay", None) is None
    bare = TunedModel.__new__(TunedModel)  # no __init__, no base: no recursion in __getattr__
    with pytest.raises(AttributeError):
        bare.pretrained_cfg  # noqa: B018


# ---- nothing else changes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["vit", "tv_resnet"])
def test_same_module_as_the_plain_graph_module(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tuned = build(spec(case))
    monkeypatch.setattr(api.TunedModel, "adopt", lambda gm, base, size: gm)
    plain = build(spec(case))
    assert not isinstance(plain.model, TunedModel)
    assert list(tuned.model.state_dict()) == list(plain.model.state_dict())
    assert not any(k.startswith("base") for k in tuned.model.state_dict())
    flags = [(n, p.requires_grad) for n, p in tuned.model.named_parameters()]
    assert flags == [(n, p.requires_grad) for n, p in plain.model.named_parameters()]
    assert [n for n, _ in tuned.model.named_modules()] == [n for n, _ in plain.model.named_modules()]
    assert list(trainable_state(tuned.model)) == list(trainable_state(plain.model))
    assert tuned.model.code == plain.model.code
    assert tuned.report["trainable_params"] == plain.report["trainable_params"]
    # the frozen parameters are the base model's own tensors, not copies
    own = {id(p) for p in tuned.base.parameters()}
    assert all(id(p) in own for n, p in tuned.model.named_parameters() if not n.startswith(TUNER_ROOT + "."))
    tuned.model.eval()
    plain.model.eval()
    with torch.no_grad():
        assert torch.equal(tuned.model(batch(tuned)), plain.model(batch(plain)))


# ---- forward_features / forward_head ----------------------------------------------------------------------


@pytest.mark.parametrize("case", TIMM)
def test_features_carry_the_tuners(case: str) -> None:
    built = build(spec(case))
    model, base = built.model, built.base
    x = batch(built)
    model.eval()
    base.eval()
    with torch.no_grad():  # LoRA is the identity at init: the tuned features are the base's
        assert close(model.forward_features(x), base.forward_features(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert close(pre, base.forward_head(base.forward_features(x), pre_logits=True))
    train_steps(built)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == base.forward_features(x).shape
        assert not close(feats, base.forward_features(x))  # the trained LoRA is in the features
        assert close(model.forward_head(feats), model(x))
        # no tuner after the features: the tuned head is the base's (its trained head is the same module)
        assert close(model.forward_head(feats), base.forward_head(feats))
        assert close(model.forward_head(feats, pre_logits=True), base.forward_head(feats, pre_logits=True))


def test_training_through_the_parts() -> None:
    built = build(spec("vit"))
    model = built.model.train()
    loss = model.forward_head(model.forward_features(batch(built))).logsumexp(-1).sum()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "tuner",
    [
        {"name": "vpt", "kind": "prompt", "at": "blocks.*", "length": 4},
        {"name": "side", "kind": "bypass", "at": "blocks.*"},
        {"name": "ssf", "kind": "ssf", "at": {"type": "LayerNorm"}},  # includes the final norm: the boundary
    ],
    ids=["prompt", "bypass", "ssf"],
)
def test_features_of_token_and_side_tuners(tuner: dict[str, Any]) -> None:
    built = build(spec("vit", tuners=[tuner]))
    model, base = built.model, built.base
    train_steps(built)
    x = batch(built)
    base.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == base.forward_features(x).shape  # prompt tokens are dropped before the head
        assert not close(feats, base.forward_features(x))
        assert close(model.forward_head(feats), model(x))


def test_bypass_on_a_cnn_feeds_the_features() -> None:
    # the side network's output replaces the pool's input: that is what the head reads, so the features
    built = build(spec("resnet", tuners=[{"name": "side", "kind": "bypass", "at": "layer*"}]))
    model, base = built.model, built.base
    train_steps(built)
    x = batch(built)
    base.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == base.forward_features(x).shape
        assert not close(feats, base.forward_features(x))
        assert close(model.forward_head(feats), model(x))


def test_no_split_is_absent_with_the_reason() -> None:
    built = build(spec("vit"))
    model = built.model
    model.__dict__["_utune_split"] = "forward does not pass forward_features' output straight to forward_head"
    assert not hasattr(model, "forward_features")
    with pytest.raises(UnavailableAttributeError, match="has no forward_head: forward does not pass"):
        model.forward_head  # noqa: B018
    assert isinstance(UnavailableAttributeError("x"), TunedModelError)


# ---- reset_classifier -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TIMM)
def test_reset_classifier(case: str) -> None:
    built = build(spec(case))
    model, head = built.model, built.spec.trainable[0]
    train_steps(built)
    model.reset_classifier(3)
    assert model.num_classes == built.base.num_classes == 3
    x = batch(built)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3)
        assert close(model.forward_head(model.forward_features(x)), out)
    assert model.get_submodule(head) is built.base.get_submodule(head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{head}.weight", f"{head}.bias"} <= trainable  # the old head trained, so does the new one
    output = next(n for n in model.graph.nodes if n.op == "output")
    assert tuple(output.args[0].meta["tensor_meta"].shape) == (2, 3)  # shapes recorded again
    train_steps(built, steps=1, classes=3)  # trains with the new head


def test_reset_classifier_follows_the_old_heads_dtype() -> None:
    # as it would its device: timm makes the new head on the CPU in float32, the tuned model runs where it ran
    built = build(spec("vit"))
    model = built.model.double()
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(batch(built).double()).shape == (2, 3)


def test_reset_classifier_keeps_a_frozen_head_frozen() -> None:
    built = build(spec("vit", trainable=[]))
    built.model.reset_classifier(3)
    assert all(n.startswith(TUNER_ROOT + ".") for n, p in built.model.named_parameters() if p.requires_grad)


def test_reset_classifier_undoes_what_the_graph_cannot_follow() -> None:
    built = build(spec("vit", tuners=[{"name": "hd", "kind": "lora", "at": "head", "rank": 2}], trainable=[]))
    model, base = built.model, built.base
    old = model.head
    with pytest.raises(TunedModelError, match="rule 'hd'"):  # a LoRA sized for the old head
        model.reset_classifier(3)
    assert model.head is old and base.head is old and base.num_classes == K
    with pytest.raises(TunedModelError, match="global_pool"):  # the pooling is traced into the graph
        model.reset_classifier(K, global_pool="avg")
    assert base.global_pool == "token"
    with torch.no_grad():
        assert model(batch(built)).shape == (2, K)
    output = next(n for n in model.graph.nodes if n.op == "output")
    assert tuple(output.args[0].meta["tensor_meta"].shape) == (2, K)  # the old head's shapes again


def test_merged_export_after_reset_classifier() -> None:
    from utune.export import merged_state_dict
    from utune.models import create_model

    built = build(spec("vit"))
    train_steps(built)
    built.model.reset_classifier(3)
    plain = create_model("test_vit", num_classes=3)
    plain.load_state_dict(merged_state_dict(built).state, strict=True)
    x = batch(built)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), built.model(x), atol=1e-5)


# ---- copies -------------------------------------------------------------------------------------------------


def assert_same(other: Any, model: TunedModel, x: torch.Tensor) -> None:
    assert isinstance(other, TunedModel) and type(other).__name__ == type(model).__name__
    assert sorted(other.state_dict()) == sorted(model.state_dict())
    assert other.pretrained_cfg == model.pretrained_cfg
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
        assert torch.equal(other.forward_features(x), model.forward_features(x))
        assert close(other.forward_head(other.forward_features(x)), other(x))


def test_deepcopy_and_copy() -> None:
    built = build(spec("vit"))
    model = built.model
    train_steps(built)
    x = batch(built)
    assert_same(copy.deepcopy(model), model, x)
    assert_same(copy.copy(model), model, x)  # what DataParallel replicates
    deep = copy.deepcopy(model)
    assert deep.get_classifier() is deep.head and deep.head is not model.head  # its base shares its copies
    deep.reset_classifier(3)
    assert model.num_classes == K and deep(x).shape == (2, 3)


def test_pickle() -> None:
    # not test_vit: unpickling a GraphModule whose code checks concrete arguments (``_assert_is_none``)
    # breaks every later fx trace in the process (torch 2.14), tuned or not
    built = build(spec("resnet"))
    train_steps(built)
    buf = io.BytesIO()
    torch.save(built.model, buf)
    buf.seek(0)
    assert_same(torch.load(buf, weights_only=False), built.model, batch(built))


def test_torch_compile_sees_one_graph() -> None:
    built = build(spec("vit"))
    model = built.model.eval()
    x = batch(built)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(model.forward_features, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), model.forward_features(x))

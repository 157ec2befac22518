"""The contract matrix: every tuner kind x the small architectures where it applies.

For each case: tuned == base at init within the kind's declared tolerance (or, for kinds that are not
the identity at init, a reported non-zero difference); after one optimizer step only tuner and
``trainable:`` parameters changed, each of them got a gradient; train and eval mode run; the state
dict round-trips into a freshly built model.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.archs import HEADS, model_section
from utune.api import Built, build
from utune.graph.rewrite import TUNER_ROOT
from utune.tuners.registry import get_kind

# kind case -> {arch: at-selector (and extra rule keys)}
MATRIX: dict[str, dict[str, Any]] = {
    "adapter-parallel": {
        "vit": "blocks.*.mlp",
        "deit": {"at": "blocks.*.attn", "tap": "parent.input"},
        "swin": "layers.*.blocks.*.mlp",
        "convnext": "stages.*.blocks.*",
        "resnet": "layer*.*",
        "efficientnet": "blocks.3.*",
        "tv_vit": "encoder.layers.*.mlp",
        "tv_resnet": "layer*.*",
    },
    "adapter-sequential": {
        "vit": "blocks.*.mlp",
        "swin": "layers.*.blocks.*",
        "convnext": "stages.*.blocks.*.mlp",
        "resnet": "layer*.*",
        "tv_vit": "encoder.layers.*",
    },
    "adapter-gate": {
        "vit": {"at": "blocks.*.mlp", "scale": "gate"},
        "resnet": {"at": "layer*.*", "scale": "gate"},
        "convnext": {"at": "stages.*.blocks.*", "scale": "scalar"},
        "deit": {"at": "blocks.*", "scale": 0.1},
        "swin": {"at": "layers.*.blocks.*.mlp", "scale": "none"},
    },
    "lora": {
        "vit": "blocks.*.attn.qkv",
        "deit": {"at": "blocks.*.attn.qkv", "slices": ["q", "v"], "alpha": 16, "rank": 4},
        "swin": "layers.*.blocks.*.attn.qkv",
        "convnext": "stages.*.blocks.*.mlp.fc1",
        "resnet": {"at": {"path": "layer*.**", "type": "Conv2d"}},
        "tv_resnet": {"at": {"path": "layer1.**", "type": "Conv2d"}},
        "tv_vit": "encoder.layers.*.mlp.0",
    },
    "ssf": {
        "vit": {"at": {"type": "LayerNorm"}},
        "swin": {"at": {"type": "Linear", "exclude": "head.**"}},
        "convnext": {"at": {"path": "stages.**", "type": "Conv2d"}},
        "resnet": {"at": {"type": "BatchNorm2d"}},
        "tv_vit": {"at": "encoder.layers.*.mlp.*"},
    },
    "ia3": {
        "vit": {"at": "blocks.*.attn.qkv", "slices": ["k", "v"]},
        "deit": "blocks.*.mlp.fc1",
        "swin": "layers.*.blocks.*.attn.qkv",
        "convnext": "stages.*.blocks.*.mlp.fc1",
        "resnet": {"at": {"type": "BatchNorm2d"}},  # not before a BN in train mode: its batch stats undo l
    },
    "bias": {
        "vit": {"at": {"type": "Linear"}},
        "swin": {"at": {"type": "Linear"}},
        "convnext": {"at": {"type": "Conv2d"}},
        "resnet": {"at": {"type": "Conv2d"}},
        "tv_resnet": {"at": {"type": "Conv2d"}},
    },
    "prefix-concat": {
        "vit": "blocks.*.attn",
        "deit": "blocks.*.attn",
        "vit_reg": "blocks.*.attn",
        "vit_avg": "blocks.*.attn",
        "swin": "layers.*.blocks.*.attn",  # windowed attention with a relative-position mask: padded
        "beit": "blocks.*.attn",
    },
    "prefix-parallel": {
        "vit": {"at": "blocks.*", "placement": "parallel"},
        "deit": {"at": "blocks.*.mlp", "placement": "parallel"},
        "vit_reg": {"at": "blocks.*.attn", "placement": "parallel"},
        "vit_avg": {"at": "blocks.*.attn", "placement": "parallel", "scale": "none"},
        "swin": {"at": "layers.*.blocks.*.attn", "placement": "parallel"},
    },
    "prompt-concat": {
        "vit": "blocks.*",
        "deit": "blocks.0",
        "vit_reg": "blocks.*",
        "vit_avg": "blocks.*",
        "beit": {"at": "blocks.*", "expect_error": "fails on a dummy batch"},  # relative positions: fixed N
    },
    "prompt-parallel": {
        "vit": {"at": "blocks.*.attn", "placement": "parallel"},
        "deit": {"at": "blocks.*.mlp", "placement": "parallel"},
        "vit_reg": {"at": "blocks.*", "placement": "parallel"},
        "vit_avg": {"at": "blocks.*.attn", "placement": "parallel", "scale": "scalar"},
        "swin": {"at": "layers.*.blocks.*.attn", "placement": "parallel"},
    },
    "bypass": {"vit": "blocks.*", "deit": "blocks.*", "swin": "layers.*", "convnext": "stages.*", "resnet": "layer*"},
}

CASES = [(case, arch) for case, per_arch in MATRIX.items() for arch in per_arch]


def spec_for(case: str, arch: str) -> dict[str, Any]:
    entry = MATRIX[case][arch]
    rule: dict[str, Any] = {"at": entry} if not isinstance(entry, dict) else dict(entry)
    rule.pop("expect_error", None)
    kind, _, placement = case.partition("-")
    rule = {"name": "t", "kind": kind, **rule}
    if placement in ("parallel", "sequential", "concat") and "placement" not in rule:
        rule["placement"] = placement
    return {"version": 1, "model": model_section(arch, num_classes=5), "tuners": [rule], "trainable": []}


def batch(built: Built, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *built.input_size, generator=torch.Generator().manual_seed(3))


def _build(case: str, arch: str, seed: int = 0) -> Built:
    spec = spec_for(case, arch)
    spec["trainable"] = [HEADS[arch]]
    torch.manual_seed(seed)
    return build(spec, verify=True)


@pytest.mark.parametrize(("case", "arch"), CASES, ids=[f"{c}-{a}" for c, a in CASES])
def test_contract(case: str, arch: str) -> None:
    entry = MATRIX[case][arch]
    if isinstance(entry, dict) and "expect_error" in entry:
        from utune.errors import UtuneError

        with pytest.raises(UtuneError, match=entry["expect_error"]):
            build(spec_for(case, arch))
        return
    built = _build(case, arch)
    model = built.model
    kind = get_kind(built.spec.tuners[0].kind)(built.spec.tuners[0])
    report = built.report
    assert report["tuners"][0]["sites"], "the rule matched no site"
    assert report["tuner_params"] > 0

    # 1. identity at init, within the kind's declared tolerance
    diff = report["identity_max_abs_diff"]
    if kind.identity_at_init:
        assert diff <= kind.identity_atol, f"{case} on {arch} is not the identity at init: {diff}"
    else:
        assert diff is not None and diff > 0

    # 2. one optimizer step: only tuner and trainable parameters change; each got a gradient
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tuner_names = {n for n in trainable if n.startswith(TUNER_ROOT + ".")}
    assert tuner_names and trainable - tuner_names == {n for n in trainable if n.startswith(built.spec.trainable[0])}
    with torch.no_grad():  # break zero inits (zero heads, zero last-BN gammas, tiny layer scales) so every
        for n, p in model.named_parameters():  # tuner lies on a path with a non-zero gradient
            if not n.startswith(TUNER_ROOT + "."):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    out = model(batch(built))
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([1, 2]))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), f"{n}: grad presence wrong"
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    for module_name in built.tuner_modules["t"]:
        owned = {n for n in tuner_names if n.startswith(module_name + ".")}
        assert owned & changed, f"no parameter of {module_name} moved after a step"

    # 3. both modes run; 4. the state dict round-trips into a fresh build (frozen weights included)
    model.eval()
    with torch.no_grad():
        ref = model(batch(built))
    fresh = _build(case, arch, seed=1)
    fresh.model.load_state_dict(model.state_dict(), strict=True)
    fresh.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.model(batch(built)), ref)


def test_every_kind_is_in_the_matrix() -> None:
    from utune.tuners.registry import kinds

    covered = {c.partition("-")[0] for c in MATRIX}
    assert set(kinds()) <= covered
    for kind in kinds():
        assert sum(len(v) for c, v in MATRIX.items() if c.startswith(kind)) >= 5, kind

"""The contract matrix: every built-in tuner kind x the small architectures where it applies.

The contracts are the kit's (:mod:`utune.testing`, which ``check_kind`` and ``utune tuners check`` run on
any kind): one source of truth. This file says where each kind attaches on each architecture. For each
case: traced == eager; tuned == base at init within the kind's declared tolerance (or, for kinds that are
not the identity at init, a reported non-zero difference); after one optimizer step only tuner and
``trainable:`` parameters changed, each of them got a gradient, each tuner moved; train and eval mode run;
the tuner-only file round-trips into a freshly built model. For every kind that declares itself mergeable:
after a few training steps the merged plain model equals the tuned one (1e-5 of the output scale), or the
row says which refusal the algebra forces (``merge_refused``: a shift on a layer without a bias, a GELU).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.archs import HEADS, model_section
from utune.testing import KindCheck, check_contracts, check_merge
from utune.tuners.registry import builtin_kinds, get_kind

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
        # nn.MultiheadAttention's packed in_proj_weight, seen as a fused qkv Linear (utune.graph.mha)
        "tv_vit": {"at": "encoder.layers.*.self_attention.in_proj", "slices": ["q", "v"], "rank": 4},
    },
    "lora-grouped": {  # one low-rank pair per group of a grouped / depthwise conv (LoRA's per-group form)
        "convnext": "stages.*.blocks.*.conv_dw",
        "efficientnet": {"at": {"path": "blocks.**", "type": "Conv2d"}, "rank": 2},
        "tv_shufflenet": {"at": {"path": "stage2.**", "type": "Conv2d"}, "rank": 2},
    },
    "dora": {
        "vit": "blocks.*.attn.qkv",
        "deit": {"at": "blocks.*.attn.qkv", "slices": ["q", "v"], "rank": 4, "alpha": 8},
        "swin": "layers.*.blocks.*.attn.qkv",
        "convnext": "stages.*.blocks.*.mlp.fc1",
        "resnet": {"at": {"path": "layer*.**", "type": "Conv2d"}, "rank": 2},  # downsample convs: not zero-gamma'd
        "efficientnet": {"at": "blocks.3.*.conv_dw", "rank": 2},  # depthwise: LoRA's per-group form
        "tv_vit": "encoder.layers.*.mlp.0",
    },
    "loha": {
        "vit": {"at": "blocks.*.attn.qkv", "rank": 4},
        "swin": "layers.*.blocks.*.mlp.fc1",
        "convnext": {"at": "stages.*.blocks.*.conv_dw", "rank": 2},  # depthwise: ΔW has the grouped shape
        "resnet": {"at": {"path": "layer*.**", "type": "Conv2d"}, "rank": 2, "alpha": 4},
        "tv_vit": "encoder.layers.*.mlp.0",
    },
    "lokr": {
        "vit": {"at": {"path": "blocks.**", "type": "Linear"}},
        "swin": "layers.*.blocks.*.attn.qkv",
        "convnext": {"at": "stages.*.blocks.*.mlp.fc1", "decompose_both": True, "rank": 2},
        "resnet": {"at": {"path": "layer*.**", "type": "Conv2d"}, "rank": 2},
        "efficientnet": {"at": {"path": "blocks.**", "type": "Conv2d"}},
        "tv_vit": "encoder.layers.*.mlp.3",
    },
    "oft": {  # Linear layers only (see the kind)
        "vit": {"at": "blocks.*.attn.qkv", "block_size": 16},
        "deit": {"at": "blocks.*.mlp.fc2", "block_size": 32, "neumann_terms": 5},
        "swin": {"at": "layers.*.blocks.*.attn.qkv", "block_size": 4},
        "convnext": {"at": "stages.*.blocks.*.mlp.fc1", "blocks": 4, "block_share": True},
        "tv_vit": {"at": "encoder.layers.*.mlp.0", "block_size": 32},
    },
    "boft": {  # Linear layers only (see the kind)
        "vit": {"at": "blocks.*.attn.qkv", "block_size": 4, "butterfly_factor": 2},
        "deit": {"at": "blocks.*.mlp.fc1", "block_size": 8},
        "swin": {"at": "layers.*.blocks.*.mlp.fc1", "block_size": 4, "butterfly_factor": 2},
        "convnext": {"at": "stages.*.blocks.*.mlp.fc2", "blocks": 8, "butterfly_factor": 3},
        "tv_vit": {"at": "encoder.layers.*.mlp.0", "block_size": 16, "butterfly_factor": 2},
    },
    "vera": {  # Linear layers only; A, B sized for the rule's largest layer, shared
        "vit": {"at": "blocks.*.attn.qkv", "slices": ["q", "v"], "rank": 16},
        "deit": {"at": "blocks.*.mlp.fc*", "rank": 16},
        "swin": {"at": {"type": "Linear", "exclude": "head.**"}, "rank": 8},
        "convnext": {"at": "stages.*.blocks.*.mlp.fc1", "rank": 8},
        "tv_vit": {"at": "encoder.layers.*.mlp.0", "rank": 8},
    },
    "glora": {  # Linear layers only (see the kind)
        "vit": {"at": {"path": "blocks.**", "type": "Linear"}},
        "deit": {"at": "blocks.*.attn.qkv", "a_b": "vector", "c": "vector", "d_e": "vector"},
        "swin": {"at": {"type": "Linear", "exclude": "head.**"}},  # `reduction` has no bias: no C, D, E there
        "convnext": {"at": "stages.*.blocks.*.mlp.fc1", "a_b": "constant", "c": "none"},
        "tv_vit": "encoder.layers.*.mlp.0",
    },
    "ssf": {
        "vit": {"at": {"type": "LayerNorm"}},
        "swin": {"at": {"type": "Linear", "exclude": "head.**"}, "merge_refused": "reduction .Linear. has no bias"},
        "convnext": {"at": {"path": "stages.**", "type": "Conv2d"}},
        "resnet": {"at": {"type": "BatchNorm2d"}},
        "tv_vit": {"at": "encoder.layers.*.mlp.*", "merge_refused": r"GELU\), which has no weights"},
    },
    "ssf-input": {  # y = OP(s * x + t): the op reads the rescaled input (PEFT's IA3 on feed-forward layers)
        "vit": {"at": "blocks.*.mlp.fc2", "tap": "input"},
        "swin": {"at": "layers.*.blocks.*.mlp.fc2", "tap": "input"},
        "convnext": {"at": "stages.*.blocks.*.mlp.fc2", "tap": "input"},
        "resnet": {
            "at": {"path": "layer*.**", "type": "Conv2d"},
            "tap": "input",
            "merge_refused": "pads its input|no bias to hold the shift",
        },
        "tv_vit": {"at": "encoder.layers.*.mlp.3", "tap": "input"},
    },
    "ia3": {
        "vit": {"at": "blocks.*.attn.qkv", "slices": ["k", "v"]},
        "deit": "blocks.*.mlp.fc1",
        "swin": "layers.*.blocks.*.attn.qkv",
        "convnext": "stages.*.blocks.*.mlp.fc1",
        "resnet": {"at": {"type": "BatchNorm2d"}},  # not before a BN in train mode: its batch stats undo l
        "tv_vit": {"at": "encoder.layers.*.self_attention.in_proj", "slices": ["k", "v"]},
    },
    "bias": {
        "vit": {"at": {"type": "Linear"}},
        "swin": {"at": {"type": "Linear"}, "merge_refused": "reduction .Linear. has no bias"},
        "convnext": {"at": {"type": "Conv2d"}},
        "resnet": {"at": {"type": "Conv2d"}, "merge_refused": r"\(Conv2d\) has no bias to hold the shift"},
        "tv_resnet": {"at": {"type": "Conv2d"}, "merge_refused": r"\(Conv2d\) has no bias to hold the shift"},
    },
    "prefix-concat": {
        "vit": "blocks.*.attn",
        "deit": "blocks.*.attn",
        "vit_reg": "blocks.*.attn",
        "vit_avg": "blocks.*.attn",
        "swin": "layers.*.blocks.*.attn",  # windowed attention with a relative-position mask: padded
        "beit": "blocks.*.attn",
        "tv_vit": "encoder.layers.*.self_attention",  # the sdpa of the traced-through nn.MultiheadAttention
    },
    "prefix-parallel": {
        "vit": {"at": "blocks.*", "placement": "parallel"},
        "deit": {"at": "blocks.*.mlp", "placement": "parallel"},
        "vit_reg": {"at": "blocks.*.attn", "placement": "parallel"},
        "vit_avg": {"at": "blocks.*.attn", "placement": "parallel", "scale": "none"},
        "swin": {"at": "layers.*.blocks.*.attn", "placement": "parallel"},
        "tv_vit": {"at": "encoder.layers.*.self_attention", "placement": "parallel"},  # Q through in_proj
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
        "tv_vit": {"at": "encoder.layers.*", "placement": "parallel"},  # K, V: the prompts through in_proj
    },
    "bypass": {"vit": "blocks.*", "deit": "blocks.*", "swin": "layers.*", "convnext": "stages.*", "resnet": "layer*"},
    # the adapter-style and structural methods of the zoo (issue 13)
    "adapter-houlsby": {  # Adapter+: after the block, channel scale, Houlsby init (not the identity at init)
        "vit": {"at": "blocks.*", "placement": "sequential", "init": "houlsby", "drop_path": 0.1},
        "swin": {"at": "layers.*.blocks.*", "placement": "sequential", "init": "houlsby"},
        "convnext": {"at": "stages.*.blocks.*", "placement": "sequential", "init": "houlsby"},
    },
    "convpass": {
        "vit": "blocks.*.attn",
        "deit": "blocks.*.mlp",
        "vit_reg": {"at": "blocks.*.attn", "conv_init": "xavier"},  # class + 2 register tokens as 1x1 images
        "swin": "layers.*.blocks.*.mlp",
        "convnext": "stages.*.blocks.*",  # NCHW feature maps
        "resnet": "layer1.*",
        "tv_vit": "encoder.layers.*.mlp",
    },
    "repadapter": {
        "vit": {"at": ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"], "scale": 0.5},
        "swin": {"at": ["layers.*.blocks.*.attn.qkv", "layers.*.blocks.*.mlp.fc1"], "scale": 0.5},
        "convnext": {"at": "stages.*.blocks.*.mlp.fc1", "groups": 4},  # channels last
        "resnet": {"at": {"path": "layer*.**", "type": "Conv2d"}, "bias": False},  # bias-less, padded convs
        "tv_resnet": {"at": "layer1.*.conv1", "merge_refused": "pads its input, so a shift of the input is not"},
        "tv_vit": {"at": "encoder.layers.*.mlp.0", "scale": 0.5},
    },
    "fact": {  # FacT-TT: U, V shared by every layer of the rule
        "vit": {"at": {"path": "blocks.*.**", "type": "Linear"}, "rank": 4},
        "deit": {"at": ["blocks.*.attn.qkv", "blocks.*.attn.proj"], "rank": 4},
        "swin": {"at": {"path": "layers.*.blocks.*.**", "type": "Linear"}, "rank": 4},  # widths 16 and 32: d = 16
        "convnext": {"at": "stages.1.blocks.*.mlp.fc*", "rank": 4, "scale": 2.0},
        "tv_vit": {"at": {"path": "encoder.layers.**", "type": "Linear"}, "rank": 4},
    },
    "fact-tk": {  # FacT-TK: U, V and the core tensor C shared, a vector P_k per slice
        "vit": {"at": {"path": "blocks.*.**", "type": "Linear"}, "form": "tk", "rank": 4},
        "deit": {"at": {"path": "blocks.*.**", "type": "Linear"}, "form": "tk", "rank": 8, "scale": 0.5},
        "swin": {"at": "layers.1.blocks.*.mlp.fc*", "form": "tk", "rank": 4},
        "convnext": {"at": "stages.2.blocks.*.mlp.fc*", "form": "tk", "rank": 4},
        "tv_vit": {"at": "encoder.layers.*.mlp.3", "form": "tk", "rank": 4},
    },
    "module": {  # a plain nn.Module of the user's code (tests/user_modules.py), called channels-last
        "vit": {"at": "blocks.*.mlp", "class": "tests.user_modules:Bottleneck", "scale": "channel"},
        "swin": {"at": "layers.*.blocks.*.mlp", "class": "tests.user_modules:Bottleneck", "placement": "sequential"},
        "convnext": {"at": "stages.*.blocks.*.mlp.fc1", "class": "tests.user_modules:Mixer"},  # 4x the channels
        "resnet": {"at": "layer1.*", "class": "tests.user_modules:Bottleneck", "kwargs": {"hidden": 2}},  # NCHW
        "tv_vit": {"at": "encoder.layers.*.mlp", "class": "tests.user_modules:Bottleneck", "scale": "gate"},
    },
    "vqt": {  # its head replaces the classifier: nothing else trains
        "vit": {"at": "blocks.*", "length": 2, "trainable": []},
        "deit": {"at": "blocks.*", "trainable": []},
        "vit_reg": {"at": "blocks.*", "normalize": False, "trainable": []},
        "vit_avg": {"at": {"path": "blocks.*", "layers": "0,2-3"}, "trainable": []},
        "beit": {"at": "blocks.*", "expect_error": "fails on a dummy batch"},  # relative-position bias: fixed N
        "tv_vit": {"at": "encoder.layers.*", "trainable": []},  # nn.MultiheadAttention, traced through
    },
}

CASES = [(case, arch) for case, per_arch in MATRIX.items() for arch in per_arch]


def spec_for(case: str, arch: str) -> dict[str, Any]:
    entry = MATRIX[case][arch]
    rule: dict[str, Any] = {"at": entry} if not isinstance(entry, dict) else dict(entry)
    rule.pop("expect_error", None)
    rule.pop("merge_refused", None)
    rule.pop("trainable", None)
    kind, _, placement = case.partition("-")
    rule = {"name": "t", "kind": kind, **rule}
    if placement in ("parallel", "sequential", "concat") and "placement" not in rule:
        rule["placement"] = placement
    return {"version": 1, "model": model_section(arch, num_classes=5), "tuners": [rule], "trainable": []}


def _trainable(case: str, arch: str) -> list[str]:
    entry = MATRIX[case][arch]
    return list(entry.get("trainable", [HEADS[arch]])) if isinstance(entry, dict) else [HEADS[arch]]


def _option(case: str, arch: str, key: str) -> str | None:
    entry = MATRIX[case][arch]
    return entry.get(key) if isinstance(entry, dict) else None


@pytest.mark.parametrize(("case", "arch"), CASES, ids=[f"{c}-{a}" for c, a in CASES])
def test_contract(case: str, arch: str) -> None:
    """The kit's contracts (utune.testing.check_contracts): identity at init within the kind's tolerance,
    gradients, frozen weights, every tuner moving, the tuner-only round trip, traced == eager."""
    spec = spec_for(case, arch)
    results = check_contracts(
        spec["tuners"][0],
        spec["model"],
        _trainable(case, arch),
        arch=arch,
        expect_error=_option(case, arch, "expect_error"),
    )
    KindCheck(case, results).raise_for_failures()


def test_every_kind_is_in_the_matrix() -> None:
    covered = {c.partition("-")[0] for c in MATRIX}
    assert set(builtin_kinds()) <= covered
    for kind in builtin_kinds():
        assert sum(len(v) for c, v in MATRIX.items() if c.startswith(kind)) >= 5, kind


# ---- merge: for every kind that declares itself mergeable, merged == unmerged after training steps --------

MERGEABLE = [(c, a) for c, a in CASES if get_kind(c.partition("-")[0]).mergeable]


@pytest.mark.parametrize(("case", "arch"), MERGEABLE, ids=[f"{c}-{a}" for c, a in MERGEABLE])
def test_merged_equals_unmerged(case: str, arch: str) -> None:
    """For every kind that declares itself mergeable: after a few training steps the merged plain model equals
    the tuned one (utune.testing.check_merge), or the row says which refusal the algebra forces."""
    spec = spec_for(case, arch)
    refused = _option(case, arch, "merge_refused")
    results = check_merge(spec["tuners"][0], spec["model"], _trainable(case, arch), arch=arch, refused=refused)
    KindCheck(case, results).raise_for_failures()


def test_every_kind_file_registers_its_kinds() -> None:
    """A class defining a kind in utune/tuners/*.py that the registry does not know is a bug (it would
    silently be unavailable to specs)."""
    import importlib
    import pkgutil

    import utune.tuners
    from utune.tuners.base import TunerKind
    from utune.tuners.registry import kinds

    registered = kinds()
    for info in pkgutil.iter_modules(utune.tuners.__path__):
        module = importlib.import_module(f"utune.tuners.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, TunerKind) and obj.__module__ == module.__name__:
                if "kind" in vars(obj):
                    assert registered.get(obj.kind) is obj, f"{module.__name__}.{obj.__name__} is not registered"


def test_every_join_has_an_apply_path() -> None:
    from utune.graph.manifest import JOINS
    from utune.graph.rewrite import _JOINS

    assert set(JOINS) == set(_JOINS), "a join the manifest names has no rewriter code, or the reverse"

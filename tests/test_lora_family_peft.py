"""The LoRA family against Hugging Face PEFT as the referee: DoRA, LoHa, LoKr, OFT, BOFT, VeRA (and GLoRA) on
a timm ViT's Linear layers (``qkv``, ``fc1``), and DoRA, LoHa, LoKr on Conv2d layers (a ResNet stem, ConvNeXt's
depthwise convs), the same base weights on both sides.

Each test builds the utune model and the PEFT model, gives utune's tuners random values (so nothing is at its
identity), copies them tensor by tensor into PEFT's modules and compares the outputs (1e-5 of the output
scale). Then it trains the utune model a few steps and checks that the merged plain timm model loads strictly
and matches it (1e-4 of the output scale, what ``utune export --merge`` verifies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from utune.engine.build import Built, build
from utune.export.merge import forward_eval, merged_state_dict, plain_model

peft = pytest.importorskip("peft")

K = 5


@dataclass(frozen=True)
class Backbone:
    """A timm model, the layers utune's rule selects (``at``), the same layers for PEFT (``targets``), its head."""

    name: str
    size: int
    at: Any
    targets: Any
    head: str = "head"


VIT = Backbone("test_vit", 32, ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"], ["qkv", "fc1"])  # PEFT: name suffixes
STEM = Backbone("test_resnet", 32, ["conv1.0", "conv1.3", "conv1.6"], r"conv1\.[036]", head="fc")  # 3x3 convs
DEPTHWISE = Backbone("test_convnext", 32, "stages.*.blocks.*.conv_dw", r".*\.conv_dw")  # 7x7, groups = channels


def _plain(bb: Backbone = VIT) -> torch.nn.Module:
    size = {"img_size": bb.size} if bb is VIT else {}  # CNNs take any input size
    return timm.create_model(bb.name, pretrained=False, num_classes=K, **size)


def base_weights(bb: Backbone, folder: Path) -> Path:
    """Random "pretrained" weights in a file, shared by utune and the plain timm model. Zero-initialised gains
    (ResNet's last BN gammas, ConvNeXt's 1e-6 layer scales) are set to 1 so that every tuned layer shows."""
    torch.manual_seed(0)
    state = _plain(bb).state_dict()
    for k, v in state.items():
        if k.endswith("gamma") or (k.endswith(".weight") and v.ndim == 1):
            v.fill_(1.0)
    path = folder / f"{bb.name}.safetensors"
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_weights(VIT, tmp_path_factory.mktemp("base"))


def build_utune(base: Path, rule: dict[str, Any], bb: Backbone = VIT) -> Built:
    model = {"name": bb.name, "num_classes": K, "img_size": bb.size, "pretrained": str(base)}
    spec = {"version": 1, "model": model, "trainable": [bb.head], "tuners": [{"name": "t", "at": bb.at, **rule}]}
    torch.manual_seed(1)
    return build(spec, verify=True)


def build_peft(base: Path, config: Any, bb: Backbone = VIT) -> torch.nn.Module:
    plain = _plain(bb)
    plain.load_state_dict(load_file(str(base)))
    return peft.get_peft_model(plain, config)


def randomize(built: Built, seed: int = 2) -> None:
    """Move every tuner tensor away from its init (magnitudes and scales around their init values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if name.startswith("utune."):
                noise = torch.randn(p.shape, generator=gen) * 0.1
                keep = name.endswith(("magnitude", "boft_s", "vera_lambda_d"))
                p.copy_(p * (1 + noise) if keep else noise)


def copy_into_peft(built: Built, model: torch.nn.Module, names: dict[str, str]) -> int:
    """Copy each utune tuner tensor into PEFT's (``names``: utune's name in its module -> PEFT's); returns how many."""
    peft_params = dict(model.named_parameters())
    copied = 0
    for entry in built.manifest.rule("t"):
        for mine, p in built.model.get_submodule(entry.module).named_parameters():
            site = entry.site
            theirs = peft_params[f"base_model.model.{site}.{names[mine]}"]
            with torch.no_grad():
                theirs.copy_(p.detach().reshape(theirs.shape))
            copied += 1
    return copied


def referee(built: Built, model: torch.nn.Module, head: str = "head") -> tuple[float, float]:
    with torch.no_grad():  # the head: the same trained values on both sides
        theirs = model.base_model.model.get_submodule(head)
        theirs.load_state_dict(built.model.get_submodule(head).state_dict())
    x = torch.randn(3, *built.input_size, generator=torch.Generator().manual_seed(5))
    mine, theirs = forward_eval(built.model, x), forward_eval(model, x)
    assert not torch.equal(mine, forward_eval(built.base, x)), "tuners at identity: the test would prove nothing"
    return float((mine - theirs).abs().max()), float(mine.abs().max())


def train_and_merge(built: Built, steps: int = 3) -> None:
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x, y = torch.randn(4, *built.input_size, generator=gen), torch.randint(0, K, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    plain = plain_model(built)
    plain.load_state_dict(merged_state_dict(built).state, strict=True)
    x = torch.randn(4, *built.input_size, generator=gen)
    tuned, merged = forward_eval(model, x), forward_eval(plain, x)
    diff, scale = float((tuned - merged).abs().max()), float(tuned.abs().max())
    assert diff <= 1e-4 * scale, f"merged differs by {diff:.3g} (scale {scale:.3g})"


LORA_NAMES = {
    "lora.branch.lora_A.weight": "lora_A.default.weight",
    "lora.branch.lora_B.weight": "lora_B.default.weight",
    "magnitude": "lora_magnitude_vector.default.weight",
}


def _dict_names(*names: str) -> dict[str, str]:
    return {n: f"{n}.default" for n in names}


def _glora_names() -> dict[str, str]:
    return {f"glora_{p}.{x}": f"glora_{p}.default.{x}" for p in "ABCDE" for x in ("Xd", "Xu", "X")}


# (rule, PEFT config, utune tensor name -> PEFT tensor name)
CASES: dict[str, tuple[dict[str, Any], Any, dict[str, str]]] = {
    "dora": (
        {"kind": "dora", "rank": 4, "alpha": 8},
        lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True),
        LORA_NAMES,
    ),
    "loha": (
        {"kind": "loha", "rank": 4, "alpha": 6},
        lambda t: peft.LoHaConfig(r=4, alpha=6, target_modules=t),
        _dict_names("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    ),
    "lokr": (
        {"kind": "lokr", "rank": 4, "alpha": 2},
        lambda t: peft.LoKrConfig(r=4, alpha=2, target_modules=t),
        _dict_names("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    ),
    "lokr-both-factor": (
        {"kind": "lokr", "rank": 2, "decompose_both": True, "decompose_factor": 4},
        lambda t: peft.LoKrConfig(r=2, alpha=2, target_modules=t, decompose_both=True, decompose_factor=4),
        _dict_names("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    ),
    "oft": (
        {"kind": "oft", "block_size": 16},
        lambda t: peft.OFTConfig(r=0, oft_block_size=16, target_modules=t, use_cayley_neumann=False),
        {"oft_R": "oft_R.default.weight"},
    ),
    "oft-neumann-shared": (
        {"kind": "oft", "blocks": 8, "neumann_terms": 5, "block_share": True},
        lambda t: peft.OFTConfig(r=8, oft_block_size=0, target_modules=t, block_share=True),
        {"oft_R": "oft_R.default.weight"},
    ),
    "vera": (
        {"kind": "vera", "rank": 16, "seed": 3},
        lambda t: peft.VeraConfig(r=16, target_modules=t, projection_prng_key=3),
        {"vera_lambda_d": "vera_lambda_d.default", "vera_lambda_b": "vera_lambda_b.default"},
    ),
    "glora": (
        {"kind": "glora", "rank": 4, "d_e": "vector"},
        lambda t: peft.GloraConfig(r=4, target_modules=t, config_D_E="vector"),
        _glora_names(),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_utune_equals_peft_with_the_same_tensors(base: Path, case: str) -> None:
    rule, config, names = CASES[case]
    built = build_utune(base, rule)
    assert built.report["identity_max_abs_diff"] == 0.0
    model = build_peft(base, config(VIT.targets))
    randomize(built)
    assert copy_into_peft(built, model, names) > 0
    diff, scale = referee(built, model)
    assert diff <= 1e-5 * scale, f"{case}: utune differs from PEFT by {diff:.3g} (scale {scale:.3g})"
    train_and_merge(built)


class _BlockDiag:
    """PEFT's BOFT computes several butterfly factors only with its CUDA extension (``fbd_cuda``; without it,
    it tries to compile one, then silently uses one factor); this is the same block-diagonal assembly in plain
    torch, so the referee runs PEFT's butterfly code on a CPU."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*per_factor) for per_factor in blocks])]


@pytest.mark.parametrize(("factors", "size"), [(1, 8), (2, 4), (3, 4)])
def test_boft_butterfly_factors_equal_peft(
    base: Path, factors: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiag)
    built = build_utune(base, {"kind": "boft", "block_size": size, "butterfly_factor": factors})
    assert built.report["identity_max_abs_diff"] == 0.0
    config = peft.BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=factors, target_modules=VIT.targets)
    model = build_peft(base, config)
    randomize(built)
    copy_into_peft(built, model, {"boft_R": "boft_R.default", "boft_s": "boft_s.default"})
    diff, scale = referee(built, model)
    assert diff <= 1e-5 * scale, f"BOFT m={factors}: utune differs from PEFT by {diff:.3g} (scale {scale:.3g})"
    train_and_merge(built)


def test_vera_draws_peft_s_frozen_matrices_and_shares_them(base: Path) -> None:
    built = build_utune(base, {"kind": "vera", "rank": 16, "seed": 3})
    model = build_peft(base, peft.VeraConfig(r=16, target_modules=VIT.targets, projection_prng_key=3))
    theirs = model.base_model.model.blocks[0].attn.qkv
    mods = [built.model.get_submodule(m) for m in built.tuner_modules["t"]]
    assert all(m.vera_A is mods[0].vera_A and m.vera_B is mods[0].vera_B for m in mods)  # one tensor each
    assert torch.equal(mods[0].vera_A, theirs.vera_A["default"])
    assert torch.equal(mods[0].vera_B, theirs.vera_B["default"])
    assert built.report["tuner_params"] == len(mods) * (16 + 192)  # only λ_d (r) and λ_b (out) train


CONV_CASES = [("dora", STEM), ("loha", STEM), ("lokr", STEM), ("loha", DEPTHWISE), ("lokr", DEPTHWISE)]


@pytest.mark.parametrize(("case", "bb"), CONV_CASES, ids=[f"{c}-{b.name}" for c, b in CONV_CASES])
def test_conv_kinds_equal_peft(case: str, bb: Backbone, tmp_path: Path) -> None:
    """Conv2d: PEFT's flattened (out, in/groups·k·k) LoHa/LoKr deltas run with the conv's own geometry, grouped
    and depthwise convs included; DoRA's norm per output channel (PEFT's DoRA has no grouped form)."""
    rule, config, names = CASES[case]
    path = base_weights(bb, tmp_path)
    built = build_utune(path, rule, bb)
    assert built.report["identity_max_abs_diff"] == 0.0
    model = build_peft(path, config(bb.targets), bb)
    randomize(built)
    assert copy_into_peft(built, model, names) > 0
    diff, scale = referee(built, model, bb.head)
    assert diff <= 1e-5 * scale, f"{case} on {bb.name}: utune differs from PEFT by {diff:.3g} (scale {scale:.3g})"
    train_and_merge(built)

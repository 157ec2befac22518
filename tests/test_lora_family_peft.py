"""The LoRA family against Hugging Face PEFT as the referee: DoRA, LoHa, LoKr, OFT, BOFT, VeRA (and GLoRA) on
a timm ViT's Linear layers (``qkv``, ``fc1``), the same base weights on both sides.

Each test builds the utune model and the PEFT model, gives utune's tuners random values (so nothing is at its
identity), copies them tensor by tensor into PEFT's modules and compares the outputs (1e-5 of the output
scale). Then it trains the utune model a few steps and checks that the merged plain timm model loads strictly
and matches it (1e-4 of the output scale, what ``utune export --merge`` verifies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from utune.api import Built, build
from utune.export.merge import forward_eval, merged_state_dict, plain_model

peft = pytest.importorskip("peft")

K = 5
MODEL = {"name": "test_vit", "num_classes": K, "img_size": 32}
TARGETS = ["qkv", "fc1"]  # PEFT matches module names by suffix: blocks.N.attn.qkv, blocks.N.mlp.fc1


def _plain() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=K, img_size=32)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random "pretrained" weights in a file: utune and the plain timm model share them."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file(_plain().state_dict(), path)
    return path


def build_utune(base: Path, rule: dict[str, Any]) -> Built:
    at = ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"]  # the layers TARGETS names
    spec = {"version": 1, "model": {**MODEL, "pretrained": str(base)}, "trainable": ["head"],
            "tuners": [{"name": "t", "at": at, **rule}]}  # fmt: skip
    torch.manual_seed(1)
    return build(spec, verify=True)


def build_peft(base: Path, config: Any) -> torch.nn.Module:
    plain = _plain()
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


def referee(built: Built, model: torch.nn.Module) -> tuple[float, float]:
    with torch.no_grad():  # the head: the same trained values on both sides
        model.base_model.model.head.load_state_dict(built.model.get_submodule("head").state_dict())
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
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True),
        LORA_NAMES,
    ),
    "loha": (
        {"kind": "loha", "rank": 4, "alpha": 6},
        lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=TARGETS),
        _dict_names("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    ),
    "lokr": (
        {"kind": "lokr", "rank": 4, "alpha": 2},
        lambda: peft.LoKrConfig(r=4, alpha=2, target_modules=TARGETS),
        _dict_names("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    ),
    "lokr-both-factor": (
        {"kind": "lokr", "rank": 2, "decompose_both": True, "decompose_factor": 4},
        lambda: peft.LoKrConfig(r=2, alpha=2, target_modules=TARGETS, decompose_both=True, decompose_factor=4),
        _dict_names("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    ),
    "oft": (
        {"kind": "oft", "block_size": 16},
        lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS, use_cayley_neumann=False),
        {"oft_R": "oft_R.default.weight"},
    ),
    "oft-neumann-shared": (
        {"kind": "oft", "blocks": 8, "neumann_terms": 5, "block_share": True},
        lambda: peft.OFTConfig(r=8, oft_block_size=0, target_modules=TARGETS, block_share=True),
        {"oft_R": "oft_R.default.weight"},
    ),
    "vera": (
        {"kind": "vera", "rank": 16, "seed": 3},
        lambda: peft.VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=3),
        {"vera_lambda_d": "vera_lambda_d.default", "vera_lambda_b": "vera_lambda_b.default"},
    ),
    "glora": (
        {"kind": "glora", "rank": 4, "d_e": "vector"},
        lambda: peft.GloraConfig(r=4, target_modules=TARGETS, config_D_E="vector"),
        _glora_names(),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_utune_equals_peft_with_the_same_tensors(base: Path, case: str) -> None:
    rule, config, names = CASES[case]
    built = build_utune(base, rule)
    assert built.report["identity_max_abs_diff"] == 0.0
    model = build_peft(base, config())
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
    config = peft.BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=factors, target_modules=TARGETS)
    model = build_peft(base, config)
    randomize(built)
    copy_into_peft(built, model, {"boft_R": "boft_R.default", "boft_s": "boft_s.default"})
    diff, scale = referee(built, model)
    assert diff <= 1e-5 * scale, f"BOFT m={factors}: utune differs from PEFT by {diff:.3g} (scale {scale:.3g})"
    train_and_merge(built)


def test_vera_draws_peft_s_frozen_matrices_and_shares_them(base: Path) -> None:
    built = build_utune(base, {"kind": "vera", "rank": 16, "seed": 3})
    model = build_peft(base, peft.VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=3))
    theirs = model.base_model.model.blocks[0].attn.qkv
    mods = [built.model.get_submodule(m) for m in built.tuner_modules["t"]]
    assert all(m.vera_A is mods[0].vera_A and m.vera_B is mods[0].vera_B for m in mods)  # one tensor each
    assert torch.equal(mods[0].vera_A, theirs.vera_A["default"])
    assert torch.equal(mods[0].vera_B, theirs.vera_B["default"])
    assert built.report["tuner_params"] == len(mods) * (16 + 192)  # only λ_d (r) and λ_b (out) train

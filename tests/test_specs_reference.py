"""The reference specs under ``specs/``: every file validates, builds, runs, and trains what its header says.

Each spec is built once (cached for the module) with ``model.pretrained=false`` (nothing downloads). To keep
this file fast on a CPU, models whose input size only sizes *frozen* parameters are built at a small input:

- ViTs (timm, torchvision): ``img_size`` only sizes the position embedding, which these specs freeze;
- CNNs (ConvNeXt, ResNet) have no size-dependent parameters at all;
- Swin's attention windows and relative-position tables depend on the size, so Swin is built at 224.

The trainable-parameter counts are therefore the real-size ones; :func:`test_trainable_counts` checks that
no size-dependent parameter trains, and rebuilds at the real size where one does (``full.yaml``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from utune.api import Built, build
from utune.cli import app
from utune.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
FILES = sorted(SPECS.rglob("*.yaml"))
IDS = [p.relative_to(SPECS).as_posix() for p in FILES]
NO_DOWNLOAD = ["model.pretrained=false"]

# Parameters whose shape depends on the input size (ViT position embeddings: timm, torchvision).
SIZE_DEPENDENT = re.compile(r"(^|\.)pos_embed(ding)?$")

# Expected trainable parameters (head included) and per-rule tuner parameters, from each header's arithmetic.
EXPECTED: dict[str, tuple[int, dict[str, int]]] = {
    "vit_b16_cifar100/full.yaml": (85_875_556, {}),
    "vit_b16_cifar100/linear.yaml": (76_900, {}),
    "vit_b16_cifar100/bitfit.yaml": (179_812, {}),
    "vit_b16_cifar100/vpt_shallow.yaml": (84_580, {"prompt": 7_680}),
    "vit_b16_cifar100/vpt_deep.yaml": (169_060, {"prompt": 92_160}),
    "vit_b16_cifar100/prefix.yaml": (261_220, {"prefix": 184_320}),
    "vit_b16_cifar100/adapter.yaml": (270_556, {"adapter": 193_656}),
    "vit_b16_cifar100/adaptformer.yaml": (1_266_532, {"adaptformer": 1_189_632}),
    "vit_b16_cifar100/lora.yaml": (371_812, {"lora": 294_912}),
    "vit_b16_cifar100/utuning_single.yaml": (279_772, {"ffn": 202_872}),
    "vit_b16_cifar100/utuning_dual.yaml": (482_644, {"mha": 202_872, "ffn": 202_872}),
    "vit_b16_cifar100/utuning_tri.yaml": (676_180, {"mha": 202_872, "ffn": 202_872, "block": 193_536}),
    "vit_b16_cifar100/utuning_1.yaml": (110_712, {"mha": 16_906, "ffn": 16_906}),
    "vit_b16_cifar100/restuning_dual.yaml": (482_644, {"mha": 202_872, "ffn": 202_872}),
    "tv_vit_b16_cifar100/utuning_dual.yaml": (482_644, {"mha": 202_872, "ffn": 202_872}),
    "swin_t_cifar100/lora_adapter.yaml": (315_484, {"lora": 141_312, "ffn": 97_272}),
    "convnext_t_cifar100/adapter.yaml": (222_808, {"block": 145_908}),
    "convnext_t_cifar100/ssf.yaml": (169_636, {"ssf": 92_736}),
    "resnet50_cifar100/lora.yaml": (720_996, {"lora": 516_096}),
    "resnet50_cifar100/adapter.yaml": (686_948, {"block": 482_048}),
}
# Number of sites each rule attaches to, where the count alone would not show a wrong selection.
SITES = {
    ("vit_b16_cifar100/utuning_1.yaml", "mha"): ["blocks.0.attn"],
    ("vit_b16_cifar100/utuning_1.yaml", "ffn"): ["blocks.0::add_1"],
    ("vit_b16_cifar100/vpt_shallow.yaml", "prompt"): ["blocks.0"],
}
FULL_VIT_TOTAL = 85_875_556  # ViT-B/16 at 224 with a 100-class head (full.yaml's arithmetic)


def small_input(model_name: str) -> list[str]:
    """Overrides giving a small input where that only changes frozen parameters (see the module doc)."""
    if model_name.startswith("vit_"):
        return ["model.kwargs.img_size=32"]
    if model_name == "torchvision:vit_b_16":
        return ["model.kwargs.image_size=32"]
    if model_name.startswith(("convnext", "resnet")):
        return ["model.img_size=64"]
    return []


@functools.cache
def built(rel: str, real_size: bool = False) -> Built:
    path = SPECS / rel
    extra = [] if real_size else small_input(load_spec(path).model.name)
    return build(path, [*NO_DOWNLOAD, *extra])


def test_every_spec_is_collected() -> None:
    assert len(FILES) >= 20 and "vit_b16_cifar100/utuning_dual.yaml" in IDS


def test_every_spec_has_expected_counts() -> None:
    missing = sorted(set(IDS) - set(EXPECTED))
    assert not missing, f"add the header's trainable count of {missing} to EXPECTED"
    assert not set(EXPECTED) - set(IDS), "EXPECTED names a spec file that does not exist"


def test_cli_validates_every_spec() -> None:
    result = CliRunner().invoke(app, ["spec", "validate", *map(str, FILES)])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok ") == len(FILES)


@pytest.mark.parametrize("rel", IDS)
def test_header(rel: str) -> None:
    """A torchtune-style header: what it reproduces, the commands, and the parameter arithmetic."""
    text = (SPECS / rel).read_text(encoding="utf-8")
    header = "\n".join(re.match(r"(?:#.*\n)+", text).group(0).splitlines())  # type: ignore[union-attr]
    assert f"Run:      utune apply specs/{rel} --train --dataset cifar100" in header
    assert f"Dry run:  utune apply specs/{rel} model.pretrained=false --dry-run --verify" in header
    assert "Parameter arithmetic" in header
    total = EXPECTED[rel][0]
    assert f"{total:,}" in header, f"the header's arithmetic should arrive at {total:,}"
    assert text.count("\nversion: 1\n") == 1


@pytest.mark.parametrize("rel", IDS)
def test_builds_and_runs(rel: str) -> None:
    """Build (no weights), one forward pass on a batch of 1; tuners that claim identity at init keep the base."""
    b = built(rel)
    spec = b.spec
    x = torch.randn(1, *b.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = b.model.eval()(x)
    assert out.shape == (1, spec.model.num_classes)
    assert torch.isfinite(out).all()
    if not spec.tuners:
        return
    # The heads of some backbones start at zero (torchvision's ViT), which would make any comparison pass:
    # give every trainable base parameter (the head) random values; base and model share them.
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if p.requires_grad and not name.startswith("utune."):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        out = b.model.eval()(x)
        base = b.base.eval()(x)
    diff = float((out - base).abs().max())
    assert float(base.abs().max()) > 0
    if all(t["identity_at_init"] for t in b.report["tuners"]):
        assert diff <= 1e-5, f"{rel}: tuners that are the identity at init changed the output by {diff}"
    else:  # prompts / concat prefixes are attended to from the start, as in VPT and prefix tuning
        assert diff > 1e-6


@pytest.mark.parametrize("rel", IDS)
def test_trainable_counts(rel: str) -> None:
    b = built(rel)
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    if any(SIZE_DEPENDENT.search(n) for n in trainable) and small_input(b.spec.model.name):
        b = built(rel, real_size=True)  # a size-dependent parameter trains: count at the real size
    total, rules = EXPECTED[rel]
    assert b.report["trainable_params"] == total
    assert {t["name"]: t["params"] for t in b.report["tuners"]} == rules
    # tuner parameters are exactly the rules' modules; the rest is the `trainable:` base parameters
    assert b.report["tuner_params"] == sum(rules.values())
    for (spec_rel, rule), sites in SITES.items():
        if spec_rel == rel:
            assert next(t["sites"] for t in b.report["tuners"] if t["name"] == rule) == sites


def test_full_fine_tuning_counts_every_parameter() -> None:
    b = built("vit_b16_cifar100/full.yaml", real_size=True)
    assert b.input_size == (3, 224, 224)
    assert b.report["total_params"] == b.report["trainable_params"] == FULL_VIT_TOTAL


def test_dual_ffn_tuner_reads_the_residual_stream() -> None:
    """`blocks.N::add_1` with `tap: input` reads x (the stream after MHA), not norm2(x)."""
    b = built("vit_b16_cifar100/utuning_dual.yaml")
    calls = [n for n in b.model.graph.nodes if n.op == "call_module" and n.target == "utune.ffn.blocks_0__add_1"]
    assert len(calls) == 1
    tap = calls[0].args[0]
    assert any(u.op == "call_module" and u.target == "blocks.0.norm2" for u in tap.users)

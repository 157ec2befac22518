"""The reference specs under ``specs/``: every file validates, builds, runs, and trains what its header says.

Each spec is built once (cached for the module) with ``model.pretrained=false`` (nothing downloads). To keep
this file fast on a CPU, models whose input size only sizes *frozen* parameters are built at a small input:

- ViTs (timm, torchvision): ``img_size`` only sizes the position embedding, which these specs freeze;
- CNNs (ConvNeXt, ResNet) have no size-dependent parameters at all;
- Swin's attention windows and relative-position tables depend on the size, so Swin is built at 224.

The trainable-parameter counts are therefore the real-size ones; :func:`test_trainable_counts` checks that
no size-dependent parameter trains, and rebuilds at the real size where one does (``full.yaml``).

Random initialisation of a backbone (86 M parameters for ViT-B) costs more than the rest of a build, and
14 specs share one: the model factory is memoised and every build gets a deep copy of its model, which
is what a fresh ``create_model`` call would return up to the random values. Everything else is
``utune.engine.build.build`` as the CLI runs it. Builds run on one thread: with batches this small a second one
mostly spin-waits, which on a shared 2-core machine costs several times the CPU time.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

import utune.engine.build
from utune.cli import app
from utune.engine.build import Built, build
from utune.models import create_model
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
    "vit_b16_cifar100/restuning_bypass.yaml": (464_212, {"bypass": 387_312}),
    "vit_b16_cifar100/dora.yaml": (390_244, {"dora": 313_344}),
    "vit_b16_cifar100/loha.yaml": (371_812, {"loha": 294_912}),
    "vit_b16_cifar100/lokr.yaml": (157_540, {"lokr": 80_640}),
    "vit_b16_cifar100/oft.yaml": (560_740, {"oft": 483_840}),
    "vit_b16_cifar100/boft.yaml": (1_192_036, {"boft": 1_115_136}),
    "vit_b16_cifar100/vera.yaml": (101_476, {"vera": 24_576}),  # the VeRA paper's 24.6 K without the head
    "vit_b16_cifar100/glora.yaml": (1_514_884, {"glora": 1_437_984}),
    "resnet50_cifar100/bypass.yaml": (3_199_460, {"bypass": 2_994_560}),
    "tv_vit_b16_cifar100/utuning_dual.yaml": (482_644, {"mha": 202_872, "ffn": 202_872}),
    "swin_t_cifar100/lora_adapter.yaml": (315_484, {"lora": 141_312, "ffn": 97_272}),
    "convnext_t_cifar100/adapter.yaml": (222_808, {"block": 145_908}),
    "convnext_t_cifar100/ssf.yaml": (169_636, {"ssf": 92_736}),
    "resnet50_cifar100/lora.yaml": (720_996, {"lora": 516_096}),
    "resnet50_cifar100/adapter.yaml": (686_948, {"block": 482_048}),
    # U-Tuning Table 8's other backbones: the same methods on MAE and CLIP ViT-B/16 (the same shapes) and ViT-L/14
    "vit_b16_mae_cifar100/adapter.yaml": (270_556, {"adapter": 193_656}),
    "vit_b16_mae_cifar100/prefix.yaml": (261_220, {"prefix": 184_320}),
    "vit_b16_mae_cifar100/vpt_shallow.yaml": (84_580, {"prompt": 7_680}),
    "vit_b16_mae_cifar100/vpt_deep.yaml": (169_060, {"prompt": 92_160}),
    "vit_b16_mae_cifar100/utuning_dual.yaml": (482_644, {"mha": 202_872, "ffn": 202_872}),
    "vit_b16_clip_cifar100/adapter.yaml": (270_556, {"adapter": 193_656}),
    "vit_b16_clip_cifar100/prefix.yaml": (261_220, {"prefix": 184_320}),
    "vit_b16_clip_cifar100/vpt_shallow.yaml": (84_580, {"prompt": 7_680}),
    "vit_b16_clip_cifar100/vpt_deep.yaml": (169_060, {"prompt": 92_160}),
    "vit_b16_clip_cifar100/utuning_dual.yaml": (482_644, {"mha": 202_872, "ffn": 202_872}),
    "vit_l14_clip_cifar100/adapter.yaml": (618_836, {"adapter": 516_336}),
    "vit_l14_clip_cifar100/prefix.yaml": (594_020, {"prefix": 491_520}),
    "vit_l14_clip_cifar100/vpt_shallow.yaml": (112_740, {"prompt": 10_240}),
    "vit_l14_clip_cifar100/vpt_deep.yaml": (348_260, {"prompt": 245_760}),
    "vit_l14_clip_cifar100/utuning_dual.yaml": (1_184_324, {"mha": 540_912, "ffn": 540_912}),
    # the method zoo, adapter-style and structural methods (issue 13)
    "vit_b16_cifar100/convpass.yaml": (404_452, {"mha": 163_776, "ffn": 163_776}),
    "vit_b16_cifar100/repadapter.yaml": (316_708, {"repadapter": 239_808}),
    "vit_b16_cifar100/fact_tt.yaml": (98_404, {"fact": 21_504}),
    "vit_b16_cifar100/fact_tk.yaml": (163_428, {"fact": 86_528}),
    "vit_b16_cifar100/difffit.yaml": (208_228, {"gamma": 9_216}),
    "vit_b16_cifar100/ln_tune.yaml": (115_300, {}),
    "vit_b16_cifar100/adapter_plus.yaml": (242_884, {"adapter": 165_984}),
    "vit_b16_cifar100/vqt.yaml": (1_007_716, {"vqt": 1_007_716}),
    "vit_b16_cifar100/ssf.yaml": (282_724, {"ssf": 205_824}),  # SSF's CIFAR-100 row: 0.28 M with the head
    "vit_b16_cifar100/noah_subnet.yaml": (
        397_230,
        {"prompt": 52_992, "lora_r10": 92_160, "lora_r5": 30_720, "lora_r1": 21_504}
        | {"adapter_d10": 96_828, "adapter_d5": 16_906, "adapter_d1": 9_220},
    ),
}
SSF_BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# The sites a rule attaches to, where the count alone would not show a wrong selection.
SITES = {
    ("vit_b16_cifar100/utuning_1.yaml", "mha"): ["blocks.0.attn"],
    ("vit_b16_cifar100/utuning_1.yaml", "ffn"): ["blocks.0::add_1"],
    ("vit_b16_cifar100/vpt_shallow.yaml", "prompt"): ["blocks.0"],
    ("vit_b16_cifar100/difffit.yaml", "gamma"): [f"blocks.{i}.{b}" for i in range(6) for b in ("attn", "mlp")],
    ("vit_b16_cifar100/noah_subnet.yaml", "lora_r5"): ["blocks.2.attn.qkv", "blocks.3.attn.qkv"],
    ("vit_b16_cifar100/ssf.yaml", "ssf"): [  # SSF's sites: the patch embedding, every norm and Linear of a block
        "patch_embed.proj",
        *(f"blocks.{i}.{p}" for i in range(12) for p in SSF_BLOCK_SITES),
        "norm",
    ],
    ("vit_b16_cifar100/fact_tt.yaml", "fact"): [
        f"blocks.{i}.{p}" for i in range(12) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ],
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
def _model(
    name: str, num_classes: int | None, kwargs: tuple[tuple[str, Any], ...], img_size: int | None
) -> torch.nn.Module:
    return create_model(name, pretrained=False, num_classes=num_classes, kwargs=dict(kwargs), img_size=img_size)


def _fresh_model(
    name: str,
    *,
    pretrained: Any,
    num_classes: int | None,
    kwargs: dict[str, Any],
    img_size: int | None = None,
    notes: list[str] | None = None,
) -> torch.nn.Module:
    assert pretrained is False, "tests never download weights"
    return copy.deepcopy(_model(name, num_classes, tuple(sorted(kwargs.items())), img_size))


def build_spec(rel: str, real_size: bool = False) -> Built:
    path = SPECS / rel
    extra = [] if real_size else small_input(load_spec(path).model.name)
    with mock.patch.object(utune.engine.build, "create_model", _fresh_model):
        return build(path, [*NO_DOWNLOAD, *extra])


@dataclass
class Checked:
    """What the tests assert on; the model itself is dropped (20 backbones would not fit in memory)."""

    report: dict[str, Any]
    num_classes: int | None
    input_size: tuple[int, int, int]
    small: bool  # built at a small input (see small_input)
    trainable: list[str]  # names of the trainable parameters
    out: torch.Tensor  # logits of a batch of 1
    base_out: torch.Tensor  # the untouched model's logits on the same batch, the same head
    graph: str  # the rewritten model's code
    mean: tuple[float, ...]  # the data config's normalisation, from timm's config of the spec's model name
    pre_norm: str  # the type of the model's norm before the blocks (timm's norm_pre), "" when it has none


@functools.cache
def checked(rel: str, real_size: bool = False) -> Checked:
    """Build once; one forward pass of the tuned and the base model on a batch of 1 at the model's size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread mostly spin-waits (5x the CPU time on 2 cores)
    try:
        return _check(rel, real_size)
    finally:
        torch.set_num_threads(threads)


def _check(rel: str, real_size: bool) -> Checked:
    b = build_spec(rel, real_size)
    small = not real_size and bool(small_input(b.spec.model.name))
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    x = torch.randn(1, *b.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Some heads start at zero (torchvision's ViT), which would make the base/tuned comparison pass
        # trivially: give the trainable base parameters (the head) random values; base and model share them.
        if b.spec.tuners:
            for name, p in b.model.named_parameters():
                if p.requires_grad and not name.startswith("utune."):
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        out = b.model.eval()(x)
        base_out = b.base.eval()(x)
    pre_norm = type(b.base.norm_pre).__name__ if hasattr(b.base, "norm_pre") else ""
    mean = tuple(b.data_config["mean"])
    return Checked(
        b.report, b.spec.model.num_classes, b.input_size, small, trainable, out, base_out, b.model.code, mean, pre_norm
    )


@pytest.fixture(scope="module", autouse=True)
def _free_models() -> Iterator[None]:
    yield
    _model.cache_clear()
    checked.cache_clear()


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
    head = re.match(r"(?:#.*\n)+", text)
    assert head is not None, "a spec starts with a comment header"
    header = head.group(0)
    assert re.search(rf"Run:\s+utune apply specs/{re.escape(rel)} --train", header)
    assert re.search(
        rf"Dry run:\s+utune apply specs/{re.escape(rel)} model\.pretrained=false --dry-run --verify", header
    )
    assert "Parameter arithmetic" in header
    total = EXPECTED[rel][0]
    assert f"{total:,}" in header, f"the header's arithmetic should arrive at {total:,}"


@pytest.mark.parametrize("rel", IDS)
def test_builds_and_runs(rel: str) -> None:
    """Builds without weights and runs; tuners that claim to be the identity at init leave the output alone."""
    c = checked(rel)
    assert c.out.shape == (1, c.num_classes)
    assert torch.isfinite(c.out).all()
    assert float(c.base_out.abs().max()) > 0
    diff = float((c.out - c.base_out).abs().max())
    if all(t["identity_at_init"] for t in c.report["tuners"]):
        assert diff <= 1e-5, f"{rel}: tuners that are the identity at init changed the output by {diff}"
    else:  # prompts / concat prefixes are attended to from the start, as in VPT and prefix tuning
        assert diff > 1e-6


@pytest.mark.parametrize("rel", IDS)
def test_trainable_counts(rel: str) -> None:
    c = checked(rel)
    if c.small and any(SIZE_DEPENDENT.search(n) for n in c.trainable):
        c = checked(rel, real_size=True)  # a size-dependent parameter trains: count at the real size
    total, rules = EXPECTED[rel]
    assert c.report["trainable_params"] == total
    assert {t["name"]: t["params"] for t in c.report["tuners"]} == rules
    # tuner parameters are exactly the rules' modules; the rest is the `trainable:` base parameters
    assert c.report["tuner_params"] == sum(rules.values())
    for (spec_rel, rule), sites in SITES.items():
        if spec_rel == rel:
            assert next(list(t["sites"]) for t in c.report["tuners"] if t["name"] == rule) == sites


def test_full_fine_tuning_counts_every_parameter() -> None:
    c = checked("vit_b16_cifar100/full.yaml", real_size=True)
    assert c.input_size == (3, 224, 224)
    assert c.report["total_params"] == c.report["trainable_params"] == FULL_VIT_TOTAL


def test_dual_ffn_tuner_reads_the_residual_stream() -> None:
    """`blocks.N::add_1` with `tap: input` reads x (the stream after MHA), not norm2(x)."""
    code = checked("vit_b16_cifar100/utuning_dual.yaml").graph
    # the FFN tuner of block 0 is called on the value that blocks.0.norm2 also reads
    tap = re.search(r"utune_ffn_blocks_0__add_1 = self\.utune\.ffn\.blocks_0__add_1\((\w+)\)", code)
    assert tap is not None, "no FFN tuner call for block 0 in the rewritten code"
    assert re.search(rf"\.norm2\({tap.group(1)}\)", code), f"the FFN tuner reads {tap.group(1)}, not norm2's input"


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.mark.parametrize(
    ("folder", "mean", "pre_norm"),
    [
        ("vit_b16_mae_cifar100", (0.485, 0.456, 0.406), "Identity"),  # MAE: ImageNet statistics, no pre-norm
        ("vit_b16_clip_cifar100", CLIP_MEAN, "LayerNorm"),  # CLIP: its own statistics and ln_pre
        ("vit_l14_clip_cifar100", CLIP_MEAN, "LayerNorm"),
    ],
)
def test_other_backbones_bring_their_own_data_config(folder: str, mean: tuple[float, ...], pre_norm: str) -> None:
    """U-Tuning Table 8's backbones: the transforms and the architecture come from timm's config of each model
    name (weights tag included), nothing set by hand in the specs."""
    rels = [r for r in IDS if r.startswith(folder + "/")]
    assert sorted(Path(r).stem for r in rels) == ["adapter", "prefix", "utuning_dual", "vpt_deep", "vpt_shallow"]
    c = checked(f"{folder}/utuning_dual.yaml")
    assert c.mean == pytest.approx(mean) and c.pre_norm == pre_norm

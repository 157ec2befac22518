"""Channel layouts decided from the graph, ``channel_dim`` overrides, and the outputs of multi-output sites.

The CNNs a family sweep refused with "cannot tell the channel dim" (EdgeNeXt's NHWC blocks behind a permute,
GhostNet's concatenated and sliced maps, ShuffleNet's channel shuffle, DPN's dual paths) now take a parallel
adapter on every block, identity at init; blocks returning several values (EfficientViM, CoaT) take one on the
output the rule names.
"""

from __future__ import annotations

import operator
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import utune.engine.build
from utune.engine.build import build, trace_model
from utune.errors import SelectionError, SpecError
from utune.graph.layout import channel_dim


def adapter_spec(name: str, at: Any, img_size: int = 64, **rule: Any) -> dict[str, Any]:
    tuner = {"name": "a", "kind": "adapter", "at": at, "placement": "parallel", "dim": 4, **rule}
    return {"version": 1, "model": {"name": name, "num_classes": 5, "img_size": img_size}, "tuners": [tuner]}


@pytest.mark.parametrize(
    ("model", "at"),
    [
        ("edgenext_xx_small", "stages.*.blocks.*"),  # conv_dw -> permute to NHWC -> LN, Linear -> permute back
        ("ghostnet_050", "blocks.*.*"),  # torch.cat of two convs, then a channel slice
        ("torchvision:shufflenet_v2_x0_5", "stage*.*"),  # view/transpose/view shuffle: read by the next block's convs
        ("test_nfnet", "stages.*"),  # made and read by NormFreeBlocks: timm no-trace leaves of convolutions
    ],
)
def test_blocks_the_sweep_refused_take_an_adapter(model: str, at: str) -> None:
    built = build(adapter_spec(model, at), verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    assert all(m.channel_dim == 1 for m in _adapters(built))  # NCHW maps, whatever happens inside the block


def _adapters(built: utune.engine.build.Built) -> list[nn.Module]:
    return [built.model.get_submodule(e.module) for e in built.manifest.tuners()]


class _Maps(nn.Module):
    """Blocks whose output layout only the graph around them tells (C == W: the sizes cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.first = nn.Sequential(nn.ReLU())  # NCHW in, NCHW out; read by a conv
        self.norm = nn.LayerNorm(16)
        self.conv1d = nn.Conv1d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(self.conv(x))  # (B, 16, 16, 16): C == H == W
        y = self.norm(x.permute(0, 2, 3, 1))  # NHWC, LayerNorm over C
        z = self.conv1d(y.mean((1, 2)).unsqueeze(-1))  # (B, 16, 1): channels first in 3 dims
        return self.head(z.flatten(1) + y.mean((1, 2)))


def _site(model: nn.Module, path: str) -> tuple[Any, tuple[int, ...]]:
    traced = trace_model(model, "maps", 16)
    site = traced.sites[path]
    shape = site.shape()
    assert shape is not None
    return site, shape


def test_layout_comes_from_producers_and_readers_not_sizes() -> None:
    model = _Maps()
    site, shape = _site(model, "first")
    assert shape == (2, 16, 16, 16) and channel_dim(site, shape) == 1  # made by a conv, read by a permute -> LN
    site, shape = _site(model, "norm")
    assert channel_dim(site, shape) == -1
    site, shape = _site(model, "conv1d")
    assert shape == (2, 16, 1) and channel_dim(site, shape) == 1  # a 3-d value need not be tokens
    assert channel_dim(site, shape, override=-1) == -1  # the rule's channel_dim wins
    with pytest.raises(SelectionError, match="channel_dim 3 does not exist"):
        channel_dim(site, shape, override=3)


class _Moves(nn.Module):
    """Channels moved by swapaxes, movedim and swapdims only (MaxViT's grid attention swaps axes): every piece
    of evidence about the two blocks passes through one of them, and C == H == W."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.swapped = nn.Sequential(nn.GELU())  # (B, W, H, C)
        self.moved = nn.Sequential(nn.GELU())  # (B, C, W, H)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.swapped(torch.swapaxes(self.conv(x), 1, 3))
        b = self.moved(a.movedim(-1, 1))
        return self.head(self.norm(b.swapdims(1, 3)).mean((1, 2)))


def test_swapaxes_movedim_and_swapdims_move_the_channels() -> None:
    model = _Moves()
    site, shape = _site(model, "swapped")
    assert channel_dim(site, shape) == -1  # a conv made it channels first, then dims 1 and 3 swapped
    site, shape = _site(model, "moved")
    assert channel_dim(site, shape) == 1  # the last dim moved to 1; read back through swapdims by a LayerNorm


def test_a_leaf_says_its_layout_only_when_all_its_layers_agree() -> None:
    from utune.graph.layout import _inside

    convs = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1))
    assert _inside(convs, (2, 8, 5, 5), "in") == 1 and _inside(convs, (2, 8, 5, 5), "out") == 1
    assert _inside(convs, (2, 5, 5, 8), "in") is None  # no layer inside reads 5 channels
    mixed = nn.Sequential(nn.Conv2d(8, 8, 3), nn.LayerNorm(8), nn.Linear(8, 8))  # ConvNeXt-like: no verdict
    assert _inside(mixed, (2, 8, 8, 8), "in") is None
    tokens = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    assert _inside(tokens, (2, 4, 4, 8), "in") == 3


class _Unknown(nn.Module):
    def __init__(self, conflict: bool) -> None:
        super().__init__()
        self.conflict = conflict
        self.proj = nn.Linear(8, 8)
        self.block = nn.Sequential(nn.Identity())
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x[:, :, :8, :8].reshape(2, 3, 8, 8).repeat(1, 3, 1, 1)[:, :8]  # (2, 8, 8, 8), nothing says how
        if self.conflict:
            t = self.proj(t)  # Linear over the last dim makes it channels last...
        t = self.block(t)
        return self.conv(t).mean((1, 2, 3)) if self.conflict else t.mean((1, 2, 3))  # ...a conv reads it first


def test_no_or_conflicting_evidence_is_an_error_with_the_fix() -> None:
    site, shape = _site(_Unknown(conflict=False), "block")
    with pytest.raises(SelectionError) as e:
        channel_dim(site, shape)
    assert "no convolution, norm or Linear makes or reads it" in e.value.message and "channel_dim" in (
        e.value.hint or ""
    )
    site, shape = _site(_Unknown(conflict=True), "block")
    with pytest.raises(SelectionError) as e:
        channel_dim(site, shape)
    assert "disagree" in e.value.message and "proj (Linear) makes it" in e.value.message
    assert "conv (Conv2d) reads it" in e.value.message
    assert channel_dim(site, shape, override=1) == 1


# ---- multi-output sites ---------------------------------------------------------------------------------


class _Pair(nn.Module):
    """Returns (fa(x) * 2, fb(y), x): output 2 is an input, returned unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.fb(y)  # made first: the graph's order is not the order of the returned values
        return self.fa(x) * 2, b, x


class _TwoPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.pair = _Pair()
        self.head = nn.Linear(8, 5)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(img).flatten(2).transpose(1, 2)  # (B, 16, 8)
        a, b, same = self.pair(tokens, tokens * 3)
        return self.head(same.mean(1) + a.mean(1) + b.mean(1))


def _build_two_path(**rule: Any) -> utune.engine.build.Built:
    spec = adapter_spec("test_vit", "pair", 16, **rule)
    with mock.patch.object(utune.engine.build, "create_model", lambda *_, **__: _TwoPath()):
        return build(spec, verify=True)


def _read(built: utune.engine.build.Built) -> str:
    """What the adapter reads: ``x`` (the tokens) or ``y`` (tokens * 3)."""
    node = built.manifest.tuners()[0].nodes["call"].args[0]
    return "y" if node.target is operator.mul else "x"


def test_output_picks_a_returned_value_by_position_and_the_input_at_that_position() -> None:
    built = _build_two_path(output=1)  # fb(y), made before fa(x) in the graph
    assert built.report["identity_max_abs_diff"] <= 1e-6  # float rounding of these tiny GEMMs, run to run
    assert built.manifest.tuners()[0].nodes["onto"].target == "pair.fb" and _read(built) == "y"
    built = _build_two_path(output=0)
    assert built.manifest.tuners()[0].nodes["onto"].target is operator.mul and _read(built) == "x"
    assert _read(_build_two_path(output=0, input=1)) == "y"  # `input:` says otherwise


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({}, "has 2 outputs"),
        ({"output": 2}, "output 2 of pair is one of its inputs, returned unchanged"),
        ({"output": 5}, "returns 3 value(s); there is no output 5"),
        ({"output": 1, "input": 3}, "argument 3 of pair's forward is not a tensor"),
    ],
)
def test_multi_output_mistakes_are_one_clear_error(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(SelectionError) as e:
        _build_two_path(**rule)
    assert message in e.value.message and "'a'" in e.value.message
    if not rule:
        assert "output: N" in (e.value.hint or "")


def test_output_and_input_are_validated_in_the_spec() -> None:
    spec = adapter_spec("test_vit", "blocks.*", 32, output=-1, input="x")
    with pytest.raises(SpecError) as e:
        utune.load_spec(spec)
    assert "tuners.0.output" in str(e.value) and "tuners.0.input" in str(e.value)


def test_efficientvim_blocks_take_an_adapter_on_their_feature_output() -> None:
    spec = adapter_spec("efficientvim_m1", "stages.*.blocks.*", output=0)  # (x, h): the map, not the state
    built = build(spec, verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    assert len(built.report["tuners"][0]["sites"]) == len(built.manifest.tuners()) > 3

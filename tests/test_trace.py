"""Traced == eager, bit-exactly in eval mode, on real architectures; untraceable models say why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.archs import ARCHS
from utune.errors import TraceError
from utune.graph.trace import trace
from utune.models import create_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_traced_equals_eager(arch: str) -> None:
    name, kwargs, size = ARCHS[arch]
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, kwargs=kwargs).eval()
    gm = trace(model, name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    # the traced module shares the model's parameters (no copies)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in gm.parameters())


def test_train_mode_graph_matches_eager_in_train_mode() -> None:
    name, kwargs, size = ARCHS["deit"]
    model = create_model(name, num_classes=3, kwargs={**kwargs, "drop_path_rate": 0.5, "drop_rate": 0.5})
    gm = trace(model, name)
    model.train()
    gm.train()
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = gm(x)
    assert torch.equal(a, b)  # dropout / drop-path are leaves: same random draws in the same order


def _draws_in_training_only(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> None:
    """In train mode the graph draws exactly what the eager model draws (and they are draws: another seed
    differs); in eval mode both are deterministic and equal."""
    model.train()
    gm.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = gm(x)
    torch.manual_seed(2)
    assert torch.equal(a, b) and not torch.allclose(b, gm(x))
    model.eval()
    gm.eval()
    assert torch.equal(gm(x), model(x)) and torch.equal(gm(x), gm(x))


@pytest.mark.parametrize("arch", ["deit", "swin", "beit"])
def test_attention_dropout_applies_in_training_only(arch: str) -> None:
    """timm's fused attention passes ``dropout_p=self.attn_drop.p if self.training else 0.0``: the train and
    eval graphs differ in that constant alone, and the one graph kept must read the mode at run time (it
    kept the eval graph's 0.0: attention dropout was silently off in training)."""
    name, kwargs, size = ARCHS[arch]
    model = create_model(name, num_classes=3, kwargs={**kwargs, "attn_drop_rate": 0.5})
    _draws_in_training_only(model, trace(model, name), torch.randn(2, 3, size, size))


@pytest.mark.parametrize("name", ["torchvision:efficientnet_b0", "torchvision:swin_t"])
def test_torchvision_stochastic_depth_applies_in_training_only(name: str) -> None:
    """torchvision's ``stochastic_depth(x, p, mode, self.training)`` (EfficientNet, ConvNeXt, Swin, MaxViT):
    the traces differ in that flag alone; it was the eval graph's False, so drop-path never ran in training.
    Its module has no parameters (the graph does not keep it) and Swin calls it twice per block."""
    model = create_model(name, num_classes=3)  # stochastic_depth_prob 0.2 by default in both
    _draws_in_training_only(model, trace(model, name), torch.randn(2, 3, 64, 64))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return x


class _ModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if self.training else self.fc(x)


def test_untraceable_model_names_model_and_cause() -> None:
    with pytest.raises(TraceError) as e:
        trace(_Branchy(), "branchy")
    assert "branchy" in e.value.message and "control flow" in e.value.message
    assert e.value.exit_code == 2


def test_mode_dependent_graph_is_refused() -> None:
    with pytest.raises(TraceError, match="different graphs in train and eval"):
        trace(_ModeBranch(), "modal")


def test_fused_attention_pinned_everywhere() -> None:
    name, kwargs, _ = ARCHS["swin"]
    model = create_model(name, kwargs=kwargs)
    trace(model, name)
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)

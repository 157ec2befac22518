"""The contract kit from outside the package: ``utune.testing.check_kind`` on the example kinds of
docs/adding-a-kind.md (examples/kinds, imported as a user's package) and on deliberately broken kinds, each of
which must fail the contract it breaks, on the architecture it ran on, with the number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from utune.kinds import Layer, NotMergeable, PlanContext, Site, Tap, TunerKind, f64
from utune.testing import ContractFailure, KindCheck, check_kind

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kinds"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))  # as `pip install -e examples/kinds` would


def statuses(report: KindCheck, contract: str) -> dict[str, str]:
    return {r.arch: r.status for r in report.results if r.contract == contract}


def test_the_example_kinds_pass_every_contract(example: None) -> None:
    gated = check_kind("my_kinds.kinds:GatedAdapter")  # every default architecture, on Linear/Conv layers
    gated.raise_for_failures()
    assert statuses(gated, "identity at init") == dict.fromkeys(["vit", "swin", "convnext", "tv_resnet"], "pass")
    assert statuses(gated, "build")["resnet"] == "skip"  # its strided convs: the kind refuses them, and says so
    linear = check_kind("my_kinds.kinds:LinearAdapter", archs=["vit", "resnet"])
    linear.raise_for_failures()
    assert statuses(linear, "merged == unmerged") == {"vit": "pass"}
    assert statuses(linear, "build") == {"vit": "pass", "resnet": "skip"}  # it refuses convs, with its reason
    assert "a linear adapter goes beside a Linear layer" in next(r.detail for r in linear.results if r.status == "skip")


def test_kind_module_is_checked_from_a_rule_mapping(example: None) -> None:
    report = check_kind(
        {"kind": "module", "class": "my_kinds.mods:Bottleneck", "kwargs": {"hidden": 2}}, archs=["resnet"]
    )
    report.raise_for_failures()
    [identity] = [r for r in report.results if r.contract == "identity at init"]
    assert identity.value == 0.0 and "not declared" in identity.detail  # zero-init: the module's choice


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, zero: bool) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(c_in, 4), nn.Linear(4, c_out)
        if zero:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _io(site: Site, ctx: PlanContext) -> tuple[int, int]:
    tap, out = ctx.shape(site, Tap("input")), ctx.output_shape(site)
    assert tap is not None and out is not None
    return tap[-1], out[-1]


class NotIdentity(TunerKind):
    """Declares the identity at init (the default) but starts with a random last layer."""

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        return _Bottleneck(*_io(site, ctx), zero=False)


class _Dead(_Bottleneck):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, zero=True)
        self.unused = nn.Parameter(torch.zeros(3))  # trainable, never read: no gradient ever reaches it


class DeadParameter(TunerKind):
    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        return _Dead(*_io(site, ctx))


class _BadFold(_Bottleneck):
    def fold(self, layer: Layer, tap: str) -> None:
        if tap != "input":
            raise NotMergeable("only beside the layer")
        wd, bd, wu, bu = (f64(t) for t in (self.down.weight, self.down.bias, self.up.weight, self.up.bias))
        assert wd is not None and bd is not None and wu is not None and bu is not None
        layer.add_input_map(wu @ wd, wu @ bd)  # forgets the up projection's bias


class BadFold(TunerKind):
    mergeable = True

    def build(self, site: Site, ctx: PlanContext) -> nn.Module:
        return _BadFold(*_io(site, ctx), zero=True)


@pytest.mark.parametrize(
    ("kind", "contract"),
    [(NotIdentity, "identity at init"), (DeadParameter, "gradients"), (BadFold, "merged == unmerged")],
)
def test_a_broken_kind_fails_the_contract_it_breaks(kind: type[TunerKind], contract: str) -> None:
    report = check_kind(kind, archs=["vit"])
    assert not report.ok
    assert {(r.arch, r.contract) for r in report.failures} == {("vit", contract)}
    [failure] = report.failures
    if contract == "gradients":
        assert "no gradient" in failure.detail and "unused" in failure.detail
    else:
        assert failure.value is not None and failure.value > 0 and "max |" in failure.detail
    with pytest.raises(ContractFailure, match=f"FAIL  vit  {contract}"):
        report.raise_for_failures()


def test_the_kind_api_is_public_and_complete() -> None:
    import utune.kinds
    import utune.testing

    for name in utune.kinds.__all__:
        assert getattr(utune.kinds, name) is not None
    assert {"check_kind", "check_contracts", "check_merge", "KindCheck", "ARCHS"} <= set(vars(utune.testing))
    with pytest.raises(Exception, match="not a subclass of utune.kinds.TunerKind"):
        check_kind(nn.Linear)  # type: ignore[arg-type]

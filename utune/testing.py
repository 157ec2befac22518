"""The contract kit: the checks every tuner kind passes, runnable on any kind (yours included).

:func:`check_kind` runs the contract matrix on one kind over small real architectures (timm's ``test_vit``,
a small Swin, ``test_convnext``, ``test_resnet``, torchvision's ResNet-18 at 32 px) and returns a
:class:`KindCheck` saying which contract passed, failed (with the numbers) or was skipped (a site the kind
refuses, with its reason) on which architecture. ``utune tuners check NAME`` prints the same. utune's own
contract tests (tests/test_tuners_contract.py) run these functions on every built-in kind: one source of truth.

The contracts, per architecture:

- ``build``: the rule attaches to the sites it selects (a refusal by the kind is a skip, not a failure);
- ``traced == eager``: the traced backbone computes what the eager model does (bit-exact);
- ``identity at init``: tuned == base at init within the kind's ``identity_atol`` when it declares
  ``identity_at_init``; a kind that declares it is *not* must differ (else it understates itself); ``None``
  (``kind: module``) reports the figure;
- ``only tuners train``: what requires grad is the tuners' parameters plus the spec's ``trainable:``;
- ``gradients``: after a backward pass each of those has a gradient and nothing else does;
- ``frozen stay frozen``: after an optimizer step no other parameter changed; ``every tuner moves``: each
  tuner module has a parameter that changed (a tensor shared across sites counts for all of them);
- ``tuner-only round trip``: ``export --tuners-only``'s file, loaded into a fresh build, gives bit-identical
  outputs;
- ``merged == unmerged`` (kinds declaring ``mergeable``): after a few training steps the merged plain model
  (strict load) equals the tuned one within 1e-5 of the output scale.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from utune.engine.record import Built
    from utune.tuners.base import TunerKind

# name -> spec ``model:`` section, its classifier (kept trainable) and the sites used when none are given:
# ``layer`` a Linear/Conv layer whose input and output differ in channels, ``block`` a module that keeps them
ARCHS: dict[str, dict[str, Any]] = {
    "vit": {
        "model": {"name": "test_vit", "img_size": 160},
        "head": "head",
        "layer": "blocks.*.mlp.fc1",
        "block": "blocks.*.mlp",
    },
    "swin": {
        "model": {
            "name": "swin_tiny_patch4_window7_224",
            "kwargs": {
                "embed_dim": 16,
                "depths": [1, 1],
                "num_heads": [1, 2],
                "img_size": 32,
                "window_size": 4,
                "patch_size": 2,
            },
        },
        "head": "head",
        "layer": "layers.*.blocks.*.mlp.fc1",
        "block": "layers.*.blocks.*.mlp",
    },
    "convnext": {
        "model": {"name": "test_convnext", "img_size": 64},
        "head": "head",
        "layer": "stages.*.blocks.*.mlp.fc1",
        "block": "stages.*.blocks.*.mlp",
    },
    "resnet": {
        "model": {"name": "test_resnet", "img_size": 64},
        "head": "fc",
        "layer": {"path": "layer*.**", "type": "Conv2d"},  # the downsample convs too: the blocks' last BN starts at 0
        "block": "layer1.*",
    },
    "tv_resnet": {
        "model": {"name": "torchvision:resnet18", "img_size": 32},
        "head": "fc",
        "layer": "layer1.*.conv1",
        "block": "layer1.*",
    },
}
DEFAULT_ARCHS: tuple[str, ...] = tuple(ARCHS)
NUM_CLASSES = 5
MERGE_RTOL = 1e-5  # merged vs unmerged, relative to the output scale (float64 folds, float32 forwards)


@dataclass
class Result:
    """One contract on one architecture: ``pass``, ``fail`` or ``skip``, with what was measured."""

    arch: str
    contract: str
    status: str
    detail: str = ""
    value: float | None = None

    def line(self) -> str:
        return f"{self.status.upper():4}  {self.arch}  {self.contract}" + (f": {self.detail}" if self.detail else "")


class ContractFailure(AssertionError):
    """A kind broke a contract; the message lists each failure with its architecture and numbers."""


@dataclass
class KindCheck:
    """What :func:`check_kind` found: one :class:`Result` per contract and architecture."""

    kind: str
    results: list[Result] = field(default_factory=list)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def ok(self) -> bool:
        """No contract failed, and some architecture ran the contracts (all skipped is not a pass)."""
        return not self.failures and any(r.status == "pass" for r in self.results)

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")}
        head = f"{self.kind}: {'ok' if self.ok else 'FAILED'} ({counts['pass']} passed, {counts['fail']} failed, "
        return head + f"{counts['skip']} skipped)\n" + "\n".join(r.line() for r in self.results)

    def raise_for_failures(self) -> None:
        """Raise :class:`ContractFailure` (an AssertionError: pytest shows it) unless :attr:`ok`."""
        if not self.ok:
            raise ContractFailure(self.summary())

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": self.ok, "results": [r.__dict__ for r in self.results]}


# ---- the kind and its rule --------------------------------------------------------------------------------


def kind_name(kind: str | type[TunerKind]) -> str:
    """The name a spec uses for ``kind``: a registered name or import path as given; a class is looked up in the
    registry, else taken as the user's (``module:Qualname``, trusted: the caller handed it over)."""
    from utune.tuners.registry import builtin_kinds, use_class

    if isinstance(kind, str):
        return kind
    for name, cls in builtin_kinds().items():
        if cls is kind:
            return name
    return use_class(kind)


def _rule_of(kind: str | type[TunerKind] | Mapping[str, Any], options: Mapping[str, Any] | None) -> dict[str, Any]:
    rule = dict(kind) if isinstance(kind, Mapping) else {"kind": kind}
    if "kind" not in rule:
        raise ValueError("a rule mapping needs a `kind:` key")
    rule = {"name": "t", **rule, **(options or {})}
    from utune._imports import is_ref, trust

    trust(str(v) for v in rule.values() if is_ref(v))  # the caller named them (as a spec they pass would)
    rule["kind"] = kind_name(rule["kind"])
    return rule


def _spec(rule: Mapping[str, Any], model: Mapping[str, Any], trainable: Sequence[str]) -> dict[str, Any]:
    section = {"num_classes": NUM_CLASSES, **model}
    return {"version": 1, "model": section, "tuners": [dict(rule)], "trainable": list(trainable)}


# ---- the contracts ---------------------------------------------------------------------------------------


def _batch(built: Built, n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, *built.input_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _eval(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was)
    return out if isinstance(out, torch.Tensor) else out[0]


@torch.no_grad()
def identity_diff(built: Built) -> float:
    """max |tuned - base| at init: the build's ``--verify`` figure or, where the base model's head starts at
    zero (torchvision's) and that figure would be 0 whatever the tuners do, the same with a random head (a
    trainable base parameter, shared by both models); the base then runs as a fresh trace of it."""
    from utune.graph.trace import trace

    if built.report["output_scale"] > 0:
        return float(built.report["identity_max_abs_diff"])
    heads = [t for t in built.spec.trainable if isinstance(t, str)]
    if not heads:  # a kind with its own head (VQT): what it outputs at init is not the base's
        return float("inf")
    for p in built.base.get_submodule(heads[0]).parameters():
        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    x = _batch(built)
    return float((_eval(built.model, x) - _eval(trace(built.base), x)).abs().max())


def _tuner_params(built: Built) -> Iterator[torch.nn.Parameter]:
    from utune.graph.rewrite import TUNER_ROOT

    for n, p in built.model.named_parameters():
        if n.startswith(TUNER_ROOT + "."):
            yield p


class _Run:
    """Results of one architecture; ``check`` records a contract, ``expect`` a pass/fail by a condition."""

    def __init__(self, arch: str, out: list[Result]) -> None:
        self.arch, self.out = arch, out

    def add(self, contract: str, status: str, detail: str = "", value: float | None = None) -> None:
        self.out.append(Result(self.arch, contract, status, detail, value))

    def expect(self, contract: str, ok: bool, detail: str, value: float | None = None) -> bool:
        self.add(contract, "pass" if ok else "fail", detail, value)
        return ok


def _build(spec: dict[str, Any], run: _Run, expect_error: str | None) -> Built | None:
    """The build, or None after recording why not (a refusal by the kind: skip; any other error: fail)."""
    from utune.engine.build import build
    from utune.errors import SelectionError, UtuneError

    try:
        built = build(spec, verify=True)
    except UtuneError as e:
        first = str(e.message).splitlines()[0]
        if expect_error is not None:
            run.expect("build", re.search(expect_error, str(e)) is not None, f"refused as expected: {first}")
        elif isinstance(e, SelectionError):
            run.add("build", "skip", f"the kind refuses these sites: {first}")
        else:
            run.add("build", "fail", f"{type(e).__name__}: {first}")
        return None
    if expect_error is not None:
        run.add("build", "fail", f"expected an error matching {expect_error!r}, it built")
        return None
    sites = built.report["tuners"][0]["sites"]
    run.expect("build", bool(sites) and built.report["tuner_params"] > 0, f"{len(sites)} site(s)")
    return built


def check_contracts(
    rule: Mapping[str, Any],
    model: Mapping[str, Any],
    trainable: Sequence[str],
    *,
    arch: str = "model",
    expect_error: str | None = None,
) -> list[Result]:
    """Every contract but the merge, for one rule (``{kind, at, ...options}``) on one model section."""
    from utune.engine.build import build
    from utune.export import export_tuners, load_tuners
    from utune.tuners.registry import get_kind

    out: list[Result] = []
    run = _Run(arch, out)
    spec = _spec(rule, model, trainable)
    built = _build(spec, run, expect_error)
    if built is None:
        return out
    kind = get_kind(built.spec.tuners[0].kind)(built.spec.tuners[0])
    x = _batch(built)

    # traced == eager (the backbone): the verify batch's base output against the eager model's
    assert built.verify_batch is not None
    vx, traced_out = built.verify_batch
    eager = _eval(built.base, vx)
    d = float((eager - traced_out).abs().max())
    run.expect("traced == eager", d == 0.0, f"max |traced - eager| = {d:.3g}", d)

    # identity at init, within the kind's declared tolerance
    diff = identity_diff(built)
    claim = kind.identity_at_init
    if claim is None:
        run.add("identity at init", "pass", f"not declared; max |tuned - base| = {diff:.3g}", diff)
    elif claim:
        atol = kind.identity_atol
        run.expect("identity at init", diff <= atol, f"max |tuned - base| = {diff:.3g} (declared atol {atol:g})", diff)
    else:
        run.expect("identity at init", diff > 0, f"declared not the identity; max |tuned - base| = {diff:.3g}", diff)

    # tuner-only round trip: tuners moved off their init, exported, loaded into a fresh build
    init = [p.detach().clone() for p in _tuner_params(built)]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(13)
        for p in _tuner_params(built):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ref = _eval(built.model, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tuners.safetensors"
        export_tuners(built, path)
        fresh = build(spec)
        load_tuners(fresh, path)
    d = float((_eval(fresh.model, x) - ref).abs().max())
    run.expect("tuner-only round trip", d == 0.0, f"max |loaded - saved| = {d:.3g}", d)
    with torch.no_grad():  # the step below starts from the init (a zero bias before a train-mode BN gets a
        for p, p0 in zip(_tuner_params(built), init, strict=True):  # gradient of ~1e-10: it moves from 0 only)
            p.copy_(p0)

    _step_contracts(built, kind, run, x)
    return out


def _step_contracts(built: Built, kind: TunerKind, run: _Run, x: torch.Tensor) -> None:
    from utune.graph.rewrite import TUNER_ROOT

    model = built.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tuners = {n for n in trainable if n.startswith(TUNER_ROOT + ".")}
    heads = [g for g in built.spec.trainable if isinstance(g, str)]
    opened = {n for n in trainable if any(n == h or n.startswith(h + ".") for h in heads)}
    extra = sorted(trainable - tuners - opened)
    ok = bool(tuners) and not extra
    detail = f"{len(tuners)} tuner tensors" + (f"; also trainable: {', '.join(extra[:3])}" if extra else "")
    run.expect("only tuners train", ok, detail if tuners else "no tuner parameter requires grad")
    with torch.no_grad():  # break zero inits (zero heads, zero last-BN gammas, tiny layer scales) so every
        for n, p in model.named_parameters():  # tuner lies on a path with a non-zero gradient
            if not n.startswith(TUNER_ROOT + "."):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    with torch.random.fork_rng(devices=[]):  # train-mode draws (dropout, drop-path) the same whatever ran before:
        torch.manual_seed(0)  # a drop-path that drops a block for the whole batch would otherwise come and go
        out = model(x)
    target = torch.arange(1, x.shape[0] + 1) % out.shape[-1]
    torch.nn.functional.cross_entropy(out, target).backward()
    wrong = [n for n, p in model.named_parameters() if (p.grad is not None) != (n in trainable)]
    missing = [n for n in wrong if n in trainable]
    detail = f"no gradient: {', '.join(missing[:3])}" if missing else f"gradient on frozen: {', '.join(wrong[:3])}"
    run.expect("gradients", not wrong, detail if wrong else f"{len(trainable)} tensors, all with a gradient")
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen = sorted(changed - trainable)
    run.expect("frozen stay frozen", not frozen, f"changed: {', '.join(frozen[:3])}" if frozen else "")
    moved = {id(p) for n, p in model.named_parameters() if n in changed}
    modules = built.tuner_modules[built.spec.tuners[0].name]
    stuck = [m for m in modules if not {id(p) for p in model.get_submodule(m).parameters()} & moved]
    run.expect("every tuner moves", not stuck, f"no parameter moved in {', '.join(stuck[:3])}" if stuck else "")
    model.eval()
    model(x)  # both modes run


def check_merge(
    rule: Mapping[str, Any],
    model: Mapping[str, Any],
    trainable: Sequence[str],
    *,
    arch: str = "model",
    refused: str | None = None,
    steps: int = 3,
) -> list[Result]:
    """merged == unmerged after ``steps`` training steps; ``refused``: a regex the refusal must match instead.
    Without ``refused``, a refusal is a skip (the sites do not allow the fold) with its reason."""
    from utune.engine.build import build
    from utune.errors import ExportError, UtuneError
    from utune.export.merge import forward_eval, merged_state_dict, plain_model

    out: list[Result] = []
    run = _Run(arch, out)
    try:
        built = build(_spec(rule, model, trainable))
    except UtuneError as e:
        run.add("merged == unmerged", "skip", f"does not build: {e.message.splitlines()[0]}")
        return out
    _train_a_little(built, steps)
    try:
        result = merged_state_dict(built)
    except ExportError as e:
        why = str(e.message).splitlines()[-1].strip()
        if refused is not None:
            run.expect("merged == unmerged", re.search(refused, str(e)) is not None, f"refused: {why}")
        else:
            run.add("merged == unmerged", "skip", f"refused: {why}")
        return out
    if refused is not None:
        run.add("merged == unmerged", "fail", f"expected a refusal matching {refused!r}, it merged")
        return out
    plain = plain_model(built)
    plain.load_state_dict(result.state, strict=True)
    x = _batch(built, 4)
    tuned, merged = forward_eval(built.model, x), forward_eval(plain, x)
    if not result.folds or torch.equal(tuned, forward_eval(built.base, x)):
        run.add("merged == unmerged", "fail", "nothing was folded, or the tuners did not move: it proves nothing")
        return out
    diff, scale = float((tuned - merged).abs().max()), float(tuned.abs().max())
    detail = f"max |merged - tuned| = {diff:.3g} (output scale {scale:.3g}, allowed {MERGE_RTOL:g} of it)"
    run.expect("merged == unmerged", diff <= MERGE_RTOL * scale, detail, diff)
    return out


def _train_a_little(built: Built, steps: int) -> None:
    model = built.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(11)
    n = built.spec.model.num_classes or NUM_CLASSES
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(4, *built.input_size, generator=gen)), torch.randint(0, n, (4,), generator=gen)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# ---- the kit's entry point -----------------------------------------------------------------------------------


def check_kind(
    kind: str | type[TunerKind] | Mapping[str, Any],
    *,
    at: str | Mapping[str, Any] | None = None,
    archs: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    merge: bool | None = None,
) -> KindCheck:
    """Run the contracts on ``kind`` over small real architectures.

    ``kind``: a registered name (``lora``), an import path (``my_pkg.kinds:GatedAdapter``), a kind class,
    or a rule mapping (``{"kind": "module", "class": "my_pkg.mods:MyU"}``; its keys are the rule's).
    ``at``: where to attach: ``"layer"`` (a Linear/Conv per architecture: the default), ``"block"`` (a module
    that keeps its channels: the default for ``kind: module``), one selector for every architecture, or
    ``{arch: selector}`` (only those architectures). ``archs``: a subset of :data:`ARCHS`. ``options``:
    more rule keys (``{"rank": 4}``). ``merge``: run the merge contract (default: when the kind declares
    ``mergeable``). Nothing is downloaded; each architecture takes about a second on a CPU.
    """
    from utune.tuners.registry import get_kind

    rule = _rule_of(kind, options)
    cls = get_kind(rule["kind"])
    default = "block" if rule["kind"] == "module" else "layer"
    if isinstance(at, Mapping):
        plan = {a: at[a] for a in (archs or at)}
    else:
        plan = {a: ARCHS[a][at or default] if (at or default) in ("layer", "block") else at for a in archs or ARCHS}
    unknown = [a for a in plan if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architecture(s) {', '.join(unknown)}; the kit has: {', '.join(ARCHS)}")
    from utune.spec import load_spec

    first = next(iter(plan))
    load_spec(_spec({**rule, "at": plan[first]}, ARCHS[first]["model"], [ARCHS[first]["head"]]))  # bad keys: now
    report = KindCheck(rule["kind"])
    do_merge = cls.mergeable if merge is None else merge
    for arch, where in plan.items():
        spec_rule = {**rule, "at": where}
        with _quiet():
            report.results += check_contracts(spec_rule, ARCHS[arch]["model"], [ARCHS[arch]["head"]], arch=arch)
            built_ok = any(r.arch == arch and r.contract == "build" and r.status == "pass" for r in report.results)
            if do_merge and built_ok:
                report.results += check_merge(spec_rule, ARCHS[arch]["model"], [ARCHS[arch]["head"]], arch=arch)
    merged = [r for r in report.results if r.contract == "merged == unmerged" and r.status != "skip"]
    if do_merge and not merged:  # every architecture refused the fold: the declaration is not borne out
        if any(r.contract == "build" and r.status == "pass" for r in report.results):
            report.results.append(
                Result("all", "merged == unmerged", "fail", "declared mergeable, but no architecture merged it")
            )
    return report


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The kit's builds run in eval of the user's kind: torch's own warnings are not its findings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield

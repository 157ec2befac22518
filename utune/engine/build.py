"""The Python API the CLI is a thin layer over: ``load_spec``, ``inspect``, ``build``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from utune._imports import check_trusted, trust
from utune._reference import reference_build
from utune.engine.record import BuildReport, Built, RuleReport, Traced, model_label
from utune.engine.tuned import TunedModel
from utune.engine.tuned_ops import RECORD, make_record
from utune.errors import ModelError, SelectionError, TraceError
from utune.graph.budget import check_rule_size
from utune.graph.context import PlanContext
from utune.graph.glob import glob_match
from utune.graph.manifest import Entry, Manifest
from utune.graph.rewrite import TUNER_ROOT, Rewriter
from utune.graph.select import select
from utune.graph.shapes import NodeFailure, propagate_shapes
from utune.graph.share import Share
from utune.graph.sites import Site, find_sites
from utune.graph.trace import refuse_untraceable, trace
from utune.graph.trainable import TypeSelector, module_types, typed_parameters
from utune.models import create_model, data_config, input_size, is_factory_ref
from utune.spec import Spec, load_spec
from utune.tuners.base import TunerKind
from utune.tuners.registry import get_kind


def _propagate_shapes(gm: fx.GraphModule, size: tuple[int, int, int], explicit: bool, batch: int = 2) -> None:
    try:
        propagate_shapes(gm, torch.zeros(batch, *size))
    except NodeFailure as e:
        cause = str(e.cause).strip().splitlines()[0] if str(e.cause).strip() else type(e.cause).__name__
        if explicit:
            raise TraceError(
                f"the model does not run at {size[1]}x{size[2]} px (at node {e.node.name}: {cause})",
                hint="pick a size it supports (ViT/Swin: a multiple of the patch and window size), or leave "
                "model.img_size and data.img_size out to use the model's own size",
            ) from e
        raise TraceError(
            f"the traced model fails on a dummy batch of size {list(size)} at node {e.node.name}: {cause}",
            hint="set model.img_size to the input size this model expects",
        ) from e


def trace_model(
    model: nn.Module, name: str, img_size: int | None = None, size: tuple[int, int, int] | None = None
) -> Traced:
    """``size``: (C, H, W) when the spec or the caller says it (``model.input_size``)."""
    refuse_untraceable(model)  # before asking for an input size it could not use
    shape = input_size(model, img_size, size)  # a model that does not say its size is asked for it first
    gm = trace(model, name, img_size, shape)
    _propagate_shapes(gm, shape, explicit=img_size is not None or size is not None)
    return Traced(name, model, gm, find_sites(gm, model), shape)


def inspect(
    model_or_name: str | nn.Module | Spec | Path,
    spec: Spec | str | Path | None = None,
    *,
    grep: str | None = None,
    depth: int | None = None,
) -> list[dict[str, Any]]:
    """One row per site: ``path, op, type, shape, params`` (and ``rules`` when a spec is given).

    ``grep``: only sites whose path matches this glob (``blocks.*.attn.*``) or, without wildcards, contains
    it; ``depth``: only sites at most that many dotted segments deep (0: the top-level modules)."""
    return inspect_with_rules(model_or_name, spec, grep=grep, depth=depth)[0]


def filter_sites(rows: list[dict[str, Any]], grep: str | None = None, depth: int | None = None) -> list[dict[str, Any]]:
    """The rows of :func:`inspect` that ``grep`` and ``depth`` keep (see there)."""
    if grep:
        wild = any(c in grep for c in "*?[")
        rows = [r for r in rows if (glob_match(grep, r["path"]) if wild else grep in r["path"])]
    if depth is not None:
        rows = [r for r in rows if r["path"].split("::")[0].count(".") < depth]
    return rows


def inspect_with_rules(
    model_or_name: str | nn.Module | Spec | Path,
    spec: Spec | str | Path | None = None,
    *,
    grep: str | None = None,
    depth: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The site rows of :func:`inspect` and, with a spec, one entry per rule: ``name, kind, sites`` and
    ``error`` (why it matches nothing) and ``warnings``."""
    if isinstance(model_or_name, str) and is_factory_ref(model_or_name):
        trust([model_or_name])  # the caller named this factory: theirs to import
    if isinstance(model_or_name, Spec) or (
        isinstance(model_or_name, str | Path) and str(model_or_name).endswith((".yaml", ".yml"))
    ):
        spec = load_spec(model_or_name)
        if spec.model.name is None:
            raise ModelError(
                "the spec names no model (model.name)", hint="inspect the module itself: utune.inspect(net, spec)"
            )
        model_or_name = spec.model.name
    if spec is not None and not isinstance(spec, Spec):
        spec = load_spec(spec)
    given = isinstance(model_or_name, nn.Module)
    same = spec is not None and (spec.model.name == model_or_name or (given and spec.model.name is None))
    size = spec.model.img_size if spec is not None and same else None
    if isinstance(model_or_name, nn.Module):
        model, name = model_or_name, type(model_or_name).__name__
        traced = trace_model(model, name, size, spec.model.size if spec is not None and same else None)
    else:
        name = str(model_or_name)
        traced = _trace_by_name(
            name,
            num_classes=spec.model.num_classes if spec is not None else None,
            kwargs=dict(spec.model.kwargs) if spec is not None and same else {},
            img_size=size,
            size=spec.model.size if spec is not None and same else None,
        )
    rules = _match_rules(traced, spec) if spec is not None else []
    matches: dict[str, list[str]] = {}
    for rule in rules:
        for path in rule["sites"]:
            matches.setdefault(path, []).append(rule["name"])
    if spec is not None and same and rules and not any(r["error"] for r in rules):
        matches = _attached(spec, rules, model_or_name if given else None) or matches
    return filter_sites(_site_rows(traced, matches if spec is not None else None), grep, depth), rules


def _site_rows(traced: Traced, matches: dict[str, list[str]] | None) -> list[dict[str, Any]]:
    """One row per site; ``rules`` (the rules attached there) when a spec was given."""
    rows = []
    for path, site in traced.sites.items():
        row: dict[str, Any] = {
            "path": path,
            "op": site.op,
            "type": site.type,
            "shape": list(shape) if (shape := site.shape()) is not None else None,
            "params": site.params,
        }
        if matches is not None:
            row["rules"] = matches.get(path, [])
        rows.append(row)
    return rows


def _trace_by_name(
    name: str,
    num_classes: int | None,
    kwargs: dict[str, Any],
    img_size: int | None,
    size: tuple[int, int, int] | None = None,
) -> Traced:
    """The model traced and its shapes propagated on the meta device: no weights are allocated, so a ViT-g
    inspects in seconds. A model that does not trace or propagate on meta (no meta kernel for an op, a value
    read during ``__init__`` or ``forward``) is created for real, and any error is the real one."""

    def create() -> nn.Module:
        return create_model(name, pretrained=False, num_classes=num_classes, kwargs=kwargs, img_size=img_size)

    if not reference_build():
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no init draws leak out either
                model = create()
            return trace_model(model, name, img_size, size)
        except Exception:  # any failure on meta (UtuneErrors included) is retried for real
            pass
    return trace_model(create(), name, img_size, size)


def _attached(spec: Spec, rules: list[dict[str, Any]], model: Any = None) -> dict[str, list[str]] | None:
    """Site -> the rules the build's manifest attached there (``vpt (drop)``, ``bypass (replace_input)`` for
    joins beyond the selected sites); None, with a warning on the rules, when the spec does not build."""
    from utune.errors import UtuneError

    overrides = ["model.pretrained=false"] if spec.model.pretrained is True else []
    try:
        built = _build_on_meta(spec, overrides) if model is None else _build_on_given(spec, overrides, model)
    except UtuneError as e:
        rules[0]["warnings"].append(f"the spec does not build: {e.message}")
        return None
    out: dict[str, list[str]] = {}
    for entry in built.manifest:
        tag = entry.rule if entry.module and not entry.role else f"{entry.rule} ({entry.role or entry.join})"
        if tag not in out.setdefault(entry.site, []):
            out[entry.site].append(tag)
    for r in rules:
        r["attachments"] = len(built.manifest.rule(r["name"]))
    return out


def _build_on_given(spec: Spec, overrides: list[str], model: nn.Module) -> Built:
    """The build on the caller's own module, for its manifest only: inspecting leaves the module as it was
    (its parameters' ``requires_grad``, its dtype)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        return build(spec, [*overrides, "model.frozen_dtype=float32"], model=model)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _build_on_meta(spec: Spec, overrides: list[str]) -> Built:
    """The build on the meta device (only its manifest is read: nothing is allocated or initialised); a
    build that fails on meta is done for real, so an error is the real one."""
    if not reference_build():
        try:
            with torch.device("meta"):  # the weights do not change what is attached where
                return build(spec, [*overrides, "model.pretrained=false"])
        except Exception:  # a meta limitation or a real error: the real build tells which
            pass
    return build(spec, overrides)


def _match_rules(traced: Traced, spec: Spec) -> list[dict[str, Any]]:
    out = []
    for rule in spec.tuners:
        entry: dict[str, Any] = {"name": rule.name, "kind": rule.kind, "sites": [], "error": None, "warnings": []}
        try:
            sel = select(traced.sites, rule.at, rule.name)
            entry["sites"], entry["warnings"] = [s.path for s in sel.sites], sel.warnings
        except SelectionError as e:
            entry["error"] = e.message + (f" ({e.hint})" if e.hint else "")
        out.append(entry)
    return out


def _freeze(gm: fx.GraphModule, globs: list[str | TypeSelector], root: nn.Module | None = None) -> list[str]:
    """Only tuner-owned parameters and ``trainable:`` globs (or ``{type: ...}`` entries) train; returns the
    unfrozen base names."""
    for p in gm.parameters():
        p.requires_grad_(False)
    tuners = getattr(gm, TUNER_ROOT)
    for p in tuners.parameters():
        p.requires_grad_(True)
    opened: list[str] = []
    base_names = [n for n, _ in gm.named_parameters() if not n.startswith(TUNER_ROOT + ".")]
    for g in globs:
        if isinstance(g, TypeSelector):
            opened += [n for n in _typed(g, root or gm, base_names) if n not in opened]
            continue
        hit = [n for n in base_names if glob_match(g, n) or glob_match(g + ".**", n)]
        if not hit:
            import difflib

            close = difflib.get_close_matches(g, base_names, n=3, cutoff=0.4)
            raise SelectionError(
                f"trainable glob {g!r} matches no parameter",
                hint=(f"closest: {', '.join(close)}" if close else "globs match parameter names like head.weight")
                + " (`utune inspect MODEL` lists the modules)",
            )
        opened += [n for n in hit if n not in opened]
    params = dict(gm.named_parameters())
    for n in opened:
        params[n].requires_grad_(True)
    return opened


def _typed(sel: TypeSelector, root: nn.Module, base_names: list[str]) -> list[str]:
    """The base parameters a ``{type: ...}`` entry opens; SelectionError naming the types there when none."""
    hit = [n for n in typed_parameters(root, sel) if n in set(base_names)]
    if not hit:
        raise SelectionError(
            f"trainable entry {{{sel.describe()}}} matches no parameter",
            hint=f"module types with parameters here: {', '.join(module_types(root))}",
        )
    return hit


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(
    spec_or_path: Spec | str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    verify: bool = False,
    seed: int = 0,
    base: nn.Module | None = None,
    model: nn.Module | None = None,
    input_size: tuple[int, int, int] | list[int] | None = None,
    trusted: bool | None = None,
) -> Built:
    """Create the model, trace it, attach every rule's tuners, freeze the rest, and report.

    Model creation and tuner initialisation draw from a private RNG seeded with ``train.seed`` (the global
    torch RNG is left as it was), so a random (``pretrained: false``) backbone and the tuners' init are the
    same on every build: a run can be resumed, evaluated and exported from its spec alone.

    ``model``: any ``nn.Module`` to tune instead of creating the spec's ``model.name`` (which may then be
    left out): it is used as it is, shares its parameters with the tuned model, and ``merge_and_unload()``
    returns a copy of it (its own class) with the tuners folded in. ``input_size``: its (C, H, W) when
    neither the spec (``model.img_size``/``model.input_size``) nor the model's timm/torchvision config says
    it. ``base``: the same as ``model`` (``utune.engine.sets`` builds several tuner sets on one backbone this
    way). ``trusted=False``: the spec comes from a data file (a run's ``spec.yaml``): a factory it names is
    imported only if the user named it too (:mod:`utune._imports`).
    """
    t0 = time.perf_counter()
    if model is not None and base is not None and model is not base:
        raise ModelError("build() takes the module as model= or base=, not both", hint="pass model=net")
    given = model if model is not None else base
    if given is not None and not isinstance(given, nn.Module):
        raise ModelError(f"model= must be a torch.nn.Module, not {type(given).__name__}", hint="pass model=net")
    if input_size is not None:
        overrides = [*overrides, "model.input_size=[" + ",".join(str(int(v)) for v in input_size) + "]"]
    spec, notes, warnings = resolve_classes(load_spec(spec_or_path, overrides, trusted=trusted))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        return _build(spec, verify, seed, t0, given, notes, warnings)


def resolve_classes(spec: Spec, classes: int | None = None) -> tuple[Spec, list[str], list[str]]:
    """The one place ``model.num_classes`` defaults to the dataset's class count (when the spec names a
    dataset and leaves the count out): the spec with it set, the note saying so, and the warnings.
    ``classes``: the count when the caller has already opened the data (nothing is read again)."""
    if spec.model.num_classes is not None or not spec.data.dataset:
        return spec, [], []
    if classes is None:
        from utune.data import num_classes
        from utune.errors import DataError

        try:
            classes = num_classes(spec.data)
        except DataError as e:
            why = f"model.num_classes is left to the model's default: cannot count the classes ({e.message})"
            return spec, [], [why]
    note = f"model.num_classes = {classes}, the class count of {spec.data.dataset} (the spec leaves it out)"
    return load_spec(spec, [f"model.num_classes={classes}"]), [note], []


_resolve_classes = resolve_classes  # the name utune.engine.sets and older callers use


def _build(
    spec: Spec,
    verify: bool,
    seed: int,
    t0: float,
    base: nn.Module | None = None,
    notes: list[str] | None = None,
    warned: list[str] | None = None,
) -> Built:
    m = spec.model
    if base is not None:
        model = base
    elif m.name is None:
        raise ModelError(
            f"spec {spec.source} names no model (model.name)",
            hint="name one (a timm name, torchvision:NAME, or a factory package.module:function), or pass the "
            "module from Python: utune.build(spec, model=net)",
        )
    else:
        if not spec.trusted and is_factory_ref(m.name):  # the refusal names the file the name came from
            check_trusted(m.name, what="model.name", source=spec.source)
        model = create_model(
            m.name,
            pretrained=m.pretrained,
            num_classes=m.num_classes,
            kwargs=dict(m.kwargs),
            img_size=m.img_size,
            notes=notes,
        )
    times = {"create_s": time.perf_counter() - t0}
    label = m.name or type(model).__name__
    traced = trace_model(model, label, m.img_size, m.size)  # data.img_size alone sets model.img_size (Spec)
    times["trace_s"] = time.perf_counter() - t0 - times["create_s"]
    probe = _verify_batch(traced, seed) if verify else None
    rw = Rewriter(traced.gm, traced.sites, model, example=torch.zeros(2, *traced.input_size))
    manifest, rows, selection_warnings = attach_rules(spec, rw)
    warnings = [*(warned or []), *selection_warnings]
    rw.propagate(real=verify)  # runs the whole rewritten graph once (on meta): a rule that breaks it is named here
    times["rewrite_s"] = time.perf_counter() - t0 - times["create_s"] - times["trace_s"]
    opened = _freeze(traced.gm, list(spec.trainable), model)
    if m.frozen_dtype != "float32":  # after freezing: what needs no gradient is known only then
        from utune.graph.precision import hold_frozen

        hold_frozen(traced.gm, getattr(torch, m.frozen_dtype))
    traced.gm.train(model.training)
    tuned = TunedModel.adopt(traced.gm, model, traced.input_size)
    checked = _verify(tuned, probe, warnings) if probe is not None else {}
    times = {k: round(v, 3) for k, v in times.items()}  # model creation, trace + shapes, passes
    given = base is not None
    report = _report(spec, traced.gm, opened, rows, traced).replace(
        **checked,
        model=model_label(spec, model, given),
        build_seconds=round(time.perf_counter() - t0, 3),
        timings=times,
        warnings=tuple(warnings),
        notes=tuple(notes or ()),
    )
    config = data_config(model, m.img_size, m.size)
    tuned.__dict__[RECORD] = make_record(spec, manifest, report, config, given)  # what merge and load read
    return Built(spec, tuned, model, report, traced.input_size, config, warnings, manifest, probe, given)


def attach_rules(spec: Spec, rw: Rewriter) -> tuple[Manifest, list[RuleReport], list[str]]:
    """Select, check, plan and apply every rule in spec order; the manifest, one report row per rule, and
    the selection warnings."""
    ctx = PlanContext(rw)
    manifest, rows, warnings = Manifest(), [], []
    for rule in spec.tuners:
        kind = get_kind(rule.kind)(rule)
        sel = select(rw.sites, rule.at, rule.name)
        warnings += sel.warnings
        sites = sel.sites if rule.output is None and rule.input is None else _ports(rule, sel.sites)
        for site in sites:
            kind.check(site, ctx)
        check_rule_size(rule, type(kind), sites, ctx)  # before a byte is allocated for it
        entries = _attach(rw, kind, sites, ctx, rule.share)
        manifest.entries += entries
        row = BuildReport.rule(rule.name, rule.kind, kind.placement, kind.identity_at_init, kind.mergeable, entries)
        rows.append(dataclasses.replace(row, sites=tuple(s.path for s in sites)))  # selected, joined or not
    return manifest, rows, warnings


def _ports(rule: Any, sites: list[Site]) -> list[Site]:
    """The rule's ``output:``/``input:``: each site narrowed to that returned value and argument."""
    try:
        return [s.port(rule.output, rule.input) for s in sites]
    except SelectionError as e:
        raise SelectionError(f"rule {rule.name!r}: {e.message}", hint=e.hint) from None


def _attach(rw: Rewriter, kind: TunerKind, sites: list[Site], ctx: PlanContext, share: Share | None) -> list[Entry]:
    """The kind plans (the whole selection at once, or site by site, each site seeing the ones before
    it applied); the rewriter applies."""
    rule = kind.rule.name
    with rw.pass_for(rule, sites[0], lint=False):
        plan = kind.plan_selection(sites, ctx)
    if plan is not None:
        return rw.apply(rule, kind.kind, plan, share)
    entries: list[Entry] = []
    for site in sites:
        with rw.pass_for(rule, site, lint=False):
            plan = kind.plan(site, ctx)
        entries += rw.apply(rule, kind.kind, plan, share)
    return entries


def _verify_batch(traced: Traced, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (its own seeded generator) and the untuned model's output on it."""
    x = torch.randn(2, *traced.input_size, generator=torch.Generator().manual_seed(seed))
    return x, _forward_eval(traced.gm, x)


def _verify(model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor], warnings: list[str]) -> dict[str, float]:
    """--verify: max |tuned - base| on the probe batch, and the base output's scale."""
    x, base_out = probe
    found = {"identity_max_abs_diff": float((_forward_eval(model, x) - base_out).abs().max())}
    found["output_scale"] = float(base_out.abs().max())
    if found["output_scale"] == 0.0:
        warnings.append(
            "--verify: the base model's output is all zeros (its head starts at zero, as torchvision's "
            "without weights or the quickstart's backbone do), so |tuned - base| is the tuned output itself"
        )
    return found


def _num_outputs(gm: fx.GraphModule) -> int | None:
    """The size of the model's last output dim (its classes), from the shapes recorded on the graph."""
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    value = out.args[0] if out is not None and out.args else None
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) == 2 else None


def _report(spec: Spec, gm: fx.GraphModule, opened: list[str], rules: list[RuleReport], traced: Traced) -> BuildReport:
    total = count(gm)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    base_trainable = sum(p.numel() for n, p in gm.named_parameters() if n in set(opened))
    return BuildReport(
        model=spec.model.label,  # the given module's class replaces it (model_label)
        num_classes=spec.model.num_classes,
        num_outputs=_num_outputs(gm),
        total_params=total,
        trainable_params=trainable,
        trainable_pct=100.0 * trainable / max(total, 1),
        tuner_params=trainable - base_trainable,
        base_trainable_params=base_trainable,
        trainable=tuple(t if isinstance(t, str) else t.describe() for t in spec.trainable),
        tuners=tuple(rules),
        input_size=traced.input_size,
    )


def with_tuners(built: Built, path: str | Path, *, verify: bool = False) -> tuple[Built, dict[str, Any]]:
    """Load a tuner-only file into ``built.model`` (in place); a new record whose report names the file and,
    with ``verify`` (or when the build was verified), the loaded tuners' effect on the probe batch. Returns
    it with what the file says about itself (:func:`utune.export.load_tuners`)."""
    from utune.export.tuners_only import load_tuners

    loaded = load_tuners(built, path)
    changes: dict[str, Any] = {"tuners_file": str(path)}
    if verify and built.verify_batch is not None:  # against the base: the loaded tuners' effect
        x, base_out = built.verify_batch
        changes["identity_max_abs_diff"] = float((_forward_eval(built.model, x) - base_out).abs().max())
    return dataclasses.replace(built, report=built.report.replace(**changes)), loaded


@torch.no_grad()
def _forward_eval(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = gm.training
    gm.eval()
    try:
        out = gm(x)
    finally:
        gm.train(was)
    return out if isinstance(out, torch.Tensor) else out[0]

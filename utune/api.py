"""The Python API the CLI is a thin layer over: ``load_spec``, ``inspect``, ``build``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from utune.errors import SelectionError, TraceError
from utune.graph.glob import glob_match
from utune.graph.manifest import Attachment
from utune.graph.rewrite import TUNER_ROOT, Rewriter
from utune.graph.select import select
from utune.graph.shapes import NodeFailure, propagate_shapes
from utune.graph.sites import Site, find_sites
from utune.graph.trace import trace
from utune.models import create_model, data_config, input_size
from utune.spec import Spec, load_spec
from utune.tuners.registry import get_kind


@dataclass
class Traced:
    """A traced model with its sites, shapes propagated on a dummy batch."""

    name: str
    model: nn.Module
    gm: fx.GraphModule
    sites: dict[str, Site]
    input_size: tuple[int, int, int]


@dataclass
class Built:
    """The result of :func:`build`: the rewritten model (trainable parameters set) and its report."""

    spec: Spec
    model: fx.GraphModule
    base: nn.Module  # the untouched model object (shares the frozen parameters with ``model``)
    report: dict[str, Any]
    input_size: tuple[int, int, int]
    data_config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    tuner_modules: dict[str, list[str]] = field(default_factory=dict)  # rule -> module names in ``model``
    verify_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, base output) when verify=True
    attachments: list[Attachment] = field(default_factory=list)  # how each tuner module was attached


def _propagate_shapes(gm: fx.GraphModule, size: tuple[int, int, int], batch: int = 2) -> None:
    try:
        propagate_shapes(gm, torch.zeros(batch, *size))
    except NodeFailure as e:
        raise TraceError(
            f"the traced model fails on a dummy batch of size {list(size)} at node {e.node.name}: {e.cause}",
            hint="set model.img_size (or data.img_size) to the input size this model expects",
        ) from e


def trace_model(model: nn.Module, name: str, img_size: int | None = None) -> Traced:
    gm = trace(model, name)
    size = input_size(model, img_size)
    _propagate_shapes(gm, size)
    return Traced(name, model, gm, find_sites(gm, model), size)


def inspect(
    model_or_name: str | nn.Module | Spec | Path, spec: Spec | str | Path | None = None
) -> list[dict[str, Any]]:
    """One row per site: ``path, op, type, shape, params`` (and ``rules`` when a spec is given)."""
    if isinstance(model_or_name, Spec) or (
        isinstance(model_or_name, str | Path) and str(model_or_name).endswith((".yaml", ".yml"))
    ):
        spec = load_spec(model_or_name)
        model_or_name = spec.model.name
    if spec is not None and not isinstance(spec, Spec):
        spec = load_spec(spec)
    if isinstance(model_or_name, nn.Module):
        model, name = model_or_name, type(model_or_name).__name__
    else:
        name = str(model_or_name)
        kwargs = dict(spec.model.kwargs) if spec is not None and spec.model.name == name else {}
        model = create_model(
            name, pretrained=False, num_classes=spec.model.num_classes if spec else None, kwargs=kwargs
        )
    traced = trace_model(model, name, spec.model.img_size if spec else None)
    matches: dict[str, list[str]] = {}
    if spec is not None:
        for rule in spec.tuners:
            try:
                sel = select(traced.sites, rule.at, rule.name)
            except SelectionError:
                continue
            for s in sel.sites:
                matches.setdefault(s.path, []).append(rule.name)
    rows = []
    for path, site in traced.sites.items():
        row: dict[str, Any] = {
            "path": path,
            "op": site.op,
            "type": site.type,
            "shape": list(site.shape()) if site.shape() is not None else None,
            "params": site.params,
        }
        if spec is not None:
            row["rules"] = matches.get(path, [])
        rows.append(row)
    return rows


def _freeze(gm: fx.GraphModule, globs: list[str]) -> list[str]:
    """Only tuner-owned parameters and ``trainable:`` globs train; returns the unfrozen base names."""
    for p in gm.parameters():
        p.requires_grad_(False)
    tuners = getattr(gm, TUNER_ROOT)
    for p in tuners.parameters():
        p.requires_grad_(True)
    opened: list[str] = []
    base_names = [n for n, _ in gm.named_parameters() if not n.startswith(TUNER_ROOT + ".")]
    for g in globs:
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


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(
    spec_or_path: Spec | str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    verify: bool = False,
    seed: int = 0,
) -> Built:
    """Create the model, trace it, attach every rule's tuners, freeze the rest, and report."""
    t0 = time.perf_counter()
    spec = load_spec(spec_or_path, overrides)
    # seeded: a random (pretrained: false) backbone and the tuners' init are the same on every build,
    # so a run can be resumed, evaluated and exported from its spec alone
    torch.manual_seed(spec.train.seed)
    num_classes = spec.model.num_classes
    model = create_model(
        spec.model.name, pretrained=spec.model.pretrained, num_classes=num_classes, kwargs=dict(spec.model.kwargs)
    )
    t_created = time.perf_counter()
    traced = trace_model(model, spec.model.name, spec.model.img_size or spec.data.img_size)
    t_traced = time.perf_counter()
    gm, sites = traced.gm, traced.sites
    x = base_out = None
    if verify:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, *traced.input_size, generator=gen)
        base_out = _forward_eval(gm, x)
    rw = Rewriter(gm, sites, model, example=torch.zeros(2, *traced.input_size))
    rules: list[dict[str, Any]] = []
    warnings: list[str] = []
    modules: dict[str, list[str]] = {}
    for rule in spec.tuners:
        kind = get_kind(rule.kind)(rule)
        sel = select(sites, rule.at, rule.name)
        warnings += sel.warnings
        for site in sel.sites:
            kind.check(site)
        names = kind.insert_rule(rw, sel.sites)
        modules[rule.name] = names
        n_params = sum(count(gm.get_submodule(n)) for n in names)
        rules.append(
            {
                "name": rule.name,
                "kind": rule.kind,
                "placement": kind.placement,
                "sites": [s.path for s in sel.sites],
                "params": n_params,
                "identity_at_init": kind.identity_at_init,
                "mergeable": kind.mergeable,
            }
        )
    rw.propagate()  # runs the whole rewritten graph once: a rule that breaks it is named here
    t_rewritten = time.perf_counter()
    opened = _freeze(gm, list(spec.trainable))
    gm.train(model.training)
    total = count(gm)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    base_trainable = sum(p.numel() for n, p in gm.named_parameters() if n in set(opened))
    report: dict[str, Any] = {
        "model": spec.model.name,
        "total_params": total,
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "tuner_params": trainable - base_trainable,
        "base_trainable_params": base_trainable,
        "trainable": list(spec.trainable),
        "tuners": rules,
        "input_size": list(traced.input_size),
        "identity_max_abs_diff": None,
        "build_seconds": None,
        "warnings": warnings,
    }
    if verify:
        assert x is not None and base_out is not None
        tuned_out = _forward_eval(gm, x)
        report["identity_max_abs_diff"] = float((tuned_out - base_out).abs().max())
        report["output_scale"] = float(base_out.abs().max())
        if report["output_scale"] == 0.0:
            warnings.append(
                "--verify: the base model's output is all zeros (a zero-initialised head, e.g. torchvision "
                "without weights), so the comparison shows nothing; verify with pretrained weights"
            )
    report["build_seconds"] = round(time.perf_counter() - t0, 3)
    report["timings"] = {  # where build time goes: model creation (weight init), trace + shapes, passes
        "create_s": round(t_created - t0, 3),
        "trace_s": round(t_traced - t_created, 3),
        "rewrite_s": round(t_rewritten - t_traced, 3),
    }
    return Built(
        spec,
        gm,
        model,
        report,
        traced.input_size,
        data_config(model, spec.model.img_size or spec.data.img_size),
        warnings,
        modules,
        (x, base_out) if verify and x is not None and base_out is not None else None,
        attachments=rw.attachments,
    )


def refresh_verify(built: Built) -> None:
    """Recompute ``identity_max_abs_diff`` after the tuners changed (e.g. weights loaded from a file)."""
    if built.verify_batch is None:
        return
    x, base_out = built.verify_batch
    built.report["identity_max_abs_diff"] = float((_forward_eval(built.model, x) - base_out).abs().max())


@torch.no_grad()
def _forward_eval(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = gm.training
    gm.eval()
    try:
        out = gm(x)
    finally:
        gm.train(was)
    return out if isinstance(out, torch.Tensor) else out[0]

"""Family sweep: does every kind of backbone take the three workhorse tuners, identity at init?

For the smallest model (fewest parameters) of every model module of the installed timm, and of every
classification family of torchvision, the script builds three specs with ``verify=True``:

- ``lora``: LoRA (rank 4) on every Linear and Conv2d;
- ``adapter``: a parallel adapter (dim 8) on every block: the children of the deepest containers
  (``Sequential``/``ModuleList``) whose children are traced-through modules (``blocks.N``, ``layer1.N``,
  ``stages.N.blocks.M``); models without such a container: their top-level stages;
- ``ssf``: SSF on every normalisation layer, by type (every norm class of torch.nn and timm.layers.norm).

Each (model, tuner) pair is recorded as ``pass`` (builds and max |tuned - base| <= 1e-5 of the output
scale), ``refused`` (a :class:`~utune.errors.UtuneError`: the message a user sees), ``not_identity``,
``crash`` (any other exception: a bug) or ``timeout``. Models that cannot be created or traced are
recorded separately (they cannot take any tuner, whatever the kind). Each model runs in a forked child
with a time limit; models are created with ``pretrained=False`` at a small input (64 px where the
model runs at that size, else its own). Results: ``bench/results/sweep_families.{json,md}``.

    .venv/bin/python bench/sweep_families.py                       # everything (about N minutes on 2 cores)
    .venv/bin/python bench/sweep_families.py --models test_vit test_resnet --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe_machine, write_results  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TUNERS = ("lora", "adapter", "ssf")
SIZES = (64, 56, 112)  # px: each model is built at the first it runs at (56, 112: patch 14, window 7)
# torchvision's GoogLeNet and Inception-v3 return auxiliary logits in training mode only (two graphs): without
# them, as a user tuning them would build them
KWARGS: dict[str, dict[str, Any]] = {
    "torchvision:googlenet": {"aux_logits": False, "init_weights": True},
    "torchvision:inception_v3": {"aux_logits": False, "init_weights": True},
}


def norm_types() -> list[str]:
    """Every normalisation class torch.nn and timm.layers define (by name: a type selector matches subclasses
    too), e.g. timm's ``RmsNormFp32``, which subclasses no other norm."""
    import inspect

    import timm.layers.norm as timm_norm

    torch_norms = ["_BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "_InstanceNorm"]
    timm_norms = [
        k
        for k, v in vars(timm_norm).items()
        if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == timm_norm.__name__
    ]
    return sorted(set(torch_norms) | set(timm_norms))


NORMS = norm_types()
TOL = 1e-5  # relative to the base output's scale
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ---- which models ----------------------------------------------------------------------------------------


def _param_count_meta(factory: Any) -> int | None:
    try:
        with torch.device("meta"):
            model = factory()
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def timm_picks() -> list[str]:
    """The smallest model of each timm model module (parameters counted on the meta device, no memory)."""
    import timm

    picks = []
    for module in sorted(timm.list_modules()):
        sized = []
        for name in timm.list_models(module=module):
            n = _param_count_meta(lambda name=name: timm.create_model(name, pretrained=False))
            if n is not None:
                sized.append((n, name))
        if sized:
            picks.append(min(sized)[1])
    return picks


def torchvision_picks() -> list[str]:
    """The smallest classifier of each torchvision classification family (module)."""
    import torchvision

    families: dict[str, list[tuple[int, str]]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        family = builder.__module__.rpartition(".")[2]
        n = _param_count_meta(lambda name=name: torchvision.models.get_model(name, weights=None))
        if n is not None:
            families.setdefault(family, []).append((n, name))
    return [f"torchvision:{min(v)[1]}" for _, v in sorted(families.items())]


# ---- the specs --------------------------------------------------------------------------------------------


def _keeps_rank(site: Any) -> bool:
    shape = _shape(site.input)
    return shape is not None and any((out := _shape(o)) is not None and len(out) == len(shape) for o in site.outputs)


def _is_group(container: str, root: nn.Module, sites: dict[str, Any]) -> list[str]:
    """The children of a container that are blocks: traced-through modules (no leaf layer among them) that keep
    the rank of what they read (not patch embeddings turning maps into tokens)."""
    kids = [f"{container}.{n}".lstrip(".") for n, _ in root.get_submodule(container).named_children()]
    kids = [k for k in kids if k in sites]
    if not kids or any(sites[k].op != "composite" or not _keeps_rank(sites[k]) for k in kids):
        return []
    return kids


def blocks(sites: dict[str, Any], root: nn.Module) -> dict[str, list[str]]:
    """Container path -> its blocks: the deepest containers whose children are blocks (``blocks``,
    ``layer1``, ``stages.0.blocks``); models without any: their top-level modules that keep the rank (the
    stem and stages, not the pooling) except the classifier."""
    from utune.models import classifier_names

    groups: dict[str, list[str]] = {}
    for path, mod in root.named_modules():
        if isinstance(mod, CONTAINERS) and (kids := _is_group(path, root, sites)):
            groups[path] = kids
    order = {p: i for i, p in enumerate(sites)}
    deepest = [g for g in groups if not any(o != g and o.startswith(g + ".") for o in groups)]
    if not deepest:
        heads = {c.split(".")[0] for c in classifier_names(root)}
        top = [
            p for p, s in sites.items() if "." not in p and s.op == "composite" and p not in heads and _keeps_rank(s)
        ]
        return {"": top} if top else {}
    return {g: sorted(groups[g], key=order.__getitem__) for g in sorted(deepest, key=lambda g: order[groups[g][0]])}


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if node is not None else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _handed_on(site: Any, i: int) -> bool:
    node = site.returns[i] if i < len(site.returns) else None
    return node is not None and node in site.outputs and _shape(node) is not None


def ports(sites: dict[str, Any], paths: list[str]) -> dict[str, int]:
    """What a user writes for blocks that return several values or take several tensors (CoaT, EfficientViM,
    CaiT's class-attention blocks): ``output:`` the first returned value the block computes; ``input:`` the
    argument shaped like it, when the first one is not."""
    site = next((sites[p] for p in paths if sites[p].n_outputs > 1), sites[paths[0]])
    out: dict[str, int] = {}
    chosen = site.output
    if site.n_outputs > 1:  # the first position every block of the group computes and hands on
        used = [i for i in range(len(site.returns)) if all(_handed_on(sites[p], i) for p in paths)]
        if not used:
            return out
        out["output"], chosen = used[0], site.returns[used[0]]
    args = [a for a in site.args if a is not None]
    want = _shape(chosen)
    if len(args) > 1 and want is not None and _shape(args[0]) != want:
        same = [i for i, a in enumerate(site.args) if a is not None and _shape(a) == want]
        if len(same) == 1:
            out["input"] = same[0]
    return out


def rules(tuner: str, groups: dict[str, list[str]], sites: dict[str, Any]) -> list[dict[str, Any]]:
    if tuner == "lora":
        return [{"name": "lora", "kind": "lora", "at": {"type": ["Linear", "Conv2d"]}, "rank": 4}]
    if tuner == "ssf":
        return [{"name": "ssf", "kind": "ssf", "at": {"type": NORMS}}]
    out = []
    for i, paths in enumerate(groups.values()):  # one rule per container: blocks of one kind share ports
        rule = {"name": f"adapter{i}", "kind": "adapter", "at": paths, "placement": "parallel", "dim": 8}
        out.append({**rule, **ports(sites, paths)})
    return out


# ---- one model ------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _size_for(name: str) -> int | None:
    """The first of ``SIZES`` the model runs at (built at that size where it takes one), else None (its own)."""
    from utune.models import create_model

    for size in SIZES:
        try:
            model = create_model(name, pretrained=False, num_classes=10, kwargs=KWARGS.get(name), img_size=size)
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, size, size))
            return size
        except Exception:
            continue
    return None


def sweep_model(name: str) -> dict[str, Any]:
    """Build the three specs on one model; a row per tuner."""
    import utune.engine.build
    from utune.engine.build import build, trace_model
    from utune.errors import UtuneError
    from utune.models import create_model

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    size = _size_for(name)
    section: dict[str, Any] = {"name": name, "num_classes": 10, "pretrained": False, "kwargs": KWARGS.get(name, {})}
    if size is not None:
        section["img_size"] = size
    try:
        model = create_model(name, pretrained=False, num_classes=10, kwargs=KWARGS.get(name), img_size=size)
        traced = trace_model(model, name, size)
    except UtuneError as e:
        return {"model": name, "error": f"{type(e).__name__}: {e.message}", "seconds": time.perf_counter() - t0}
    except Exception as e:  # a model timm/torchvision cannot create or fx cannot trace: not a tuner's fault
        return {"model": name, "error": f"{type(e).__name__}: {_first_line(e)}", "seconds": time.perf_counter() - t0}
    groups = blocks(traced.sites, model)
    specs = {t: {"version": 1, "model": section, "tuners": rules(t, groups, traced.sites)} for t in TUNERS}
    del traced
    cached = model

    def fresh(*_: Any, **__: Any) -> nn.Module:
        return copy.deepcopy(cached)

    out: dict[str, Any] = {"model": name, "img_size": size, "params": sum(p.numel() for p in model.parameters())}
    out["blocks"] = sum(len(v) for v in groups.values())
    out["ports"] = {r["name"]: {k: r[k] for k in ("output", "input") if k in r} for r in specs["adapter"]["tuners"]}
    out["ports"] = {k: v for k, v in out["ports"].items() if v}
    for tuner in TUNERS:
        spec = specs[tuner]
        if tuner == "adapter" and not groups:
            out[tuner] = {"status": "refused", "reason": "no repeated blocks found (the sweep's own selector)"}
            continue
        t1 = time.perf_counter()
        try:
            with mock.patch.object(utune.engine.build, "create_model", fresh):
                built = build(spec, verify=True)
            diff, scale = built.report["identity_max_abs_diff"], built.report["output_scale"]
            ok = diff <= TOL * max(scale, 1.0)
            row = {"status": "pass" if ok else "not_identity", "diff": diff, "scale": scale}
            row["sites"] = sum(len(t["sites"]) for t in built.report["tuners"])
            row["params"] = built.report["tuner_params"]
        except UtuneError as e:
            row = {"status": "refused", "reason": f"{e.message}" + (f" (hint: {e.hint})" if e.hint else "")}
        except Exception as e:
            row = {"status": "crash", "reason": f"{type(e).__name__}: {_first_line(e)}"}
            row["traceback"] = traceback.format_exc(limit=-4)
        row["seconds"] = round(time.perf_counter() - t1, 2)
        out[tuner] = row
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _child(name: str, conn: Any) -> None:
    try:
        conn.send(sweep_model(name))
    except BaseException as e:  # the child must always answer
        conn.send({"model": name, "error": f"sweep failure: {type(e).__name__}: {_first_line(e)}"})
    finally:
        conn.close()


def run_one(name: str, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, child))
    t0 = time.perf_counter()
    proc.start()
    child.close()
    row = None
    if parent.poll(timeout):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        code = proc.exitcode
        why = f"timeout after {timeout:.0f} s" if code in (None, -9) else f"child died (exit code {code})"
        row = {"model": name, "timeout": why, "seconds": round(time.perf_counter() - t0, 1)}
    return row


# ---- the record -----------------------------------------------------------------------------------------


def status_of(row: dict[str, Any], tuner: str) -> str:
    if "timeout" in row:
        return "timeout"
    if "error" in row:
        return "model_error"
    return str(row[tuner]["status"])


# why a pair was refused, in groups (the first pattern that matches the user's message)
CATEGORIES = [
    ("grouped/depthwise conv (LoRA)", r"grouped/depthwise convolution"),
    ("no norm layer in the model (SSF)", r"rule 'ssf' .* matches no site"),
    ("tap and output shapes differ (adapter)", r"differ in tokens/resolution|do not fit|channels on dim"),
    ("channel layout not decidable", r"cannot tell the channel dim"),
    ("multi-output site", r"outputs; a tuner joins one value|output \d+ of"),
    ("rewritten model fails on a dummy batch", r"fails on a dummy batch"),
    ("the sweep found no blocks", r"no repeated blocks"),
]


def category(reason: str) -> str:
    return next((name for name, pattern in CATEGORIES if re.search(pattern, reason)), "other")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(status_of(r, t) for r in rows for t in TUNERS)
    pairs = sum(counts.values())
    refused = Counter(category(r[t]["reason"]) for r in rows for t in TUNERS if status_of(r, t) == "refused")
    buildable = pairs - counts.get("model_error", 0) - counts.get("timeout", 0)
    applicable = buildable - refused.get(CATEGORIES[1][0], 0)
    passed = counts.get("pass", 0)
    return {
        "models": len(rows),
        "pairs": pairs,
        "counts": dict(counts),
        "per_tuner": {t: dict(Counter(status_of(r, t) for r in rows)) for t in TUNERS},
        "refused_by_category": dict(refused.most_common()),
        "pass_pct": round(100 * passed / max(pairs, 1), 2),
        "pass_pct_of_buildable": round(100 * passed / max(buildable, 1), 2),
        "pass_pct_of_applicable": round(100 * passed / max(applicable, 1), 2),
    }


def _headline(s: dict[str, Any]) -> str:
    return (
        f"{s['models']} models, {s['pairs']} (model, tuner) pairs: "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items()))
        + f". Pass: {s['pass_pct']} % of all pairs; {s['pass_pct_of_buildable']} % of the pairs whose model "
        f"timm/torchvision can create and torch.fx can trace in time; {s['pass_pct_of_applicable']} % of those "
        "that have the layers the rule selects (SSF needs a norm layer)."
    )


def _cell(row: dict[str, Any], tuner: str) -> str:
    st = status_of(row, tuner)
    if st in ("model_error", "timeout", "pass"):
        return st
    return f"**{st}**: {row[tuner].get('reason', row[tuner].get('diff'))}".replace("|", "/")


def markdown(data: dict[str, Any]) -> str:
    s = data["summary"]
    lines = [f"Machine: {data['machine']['summary']}", "", f"Command: `{data['command']}` "]
    lines[-1] += f"({data['seconds'] / 60:.1f} min)"
    lines += ["", _headline(s), "", "| refused because | pairs |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s["refused_by_category"].items()]
    lines += ["", "| model | params | px | ports | " + " | ".join(TUNERS) + " |", "|---|---:|---:|---|" + "---|" * 3]
    for r in data["rows"]:
        params = f"{r['params']:,}" if "params" in r else ""
        ports = "; ".join(f"{k}: {v}" for k, v in r.get("ports", {}).items()).replace("'", "")
        cells = " | ".join(_cell(r, t) for t in TUNERS)
        lines.append(f"| {r['model']} | {params} | {r.get('img_size') or 'own'} | {ports} | {cells} |")
    bad = [r for r in data["rows"] if "error" in r or "timeout" in r]
    if bad:
        lines += ["", "Models that could not be created or traced (no tuner can attach):", ""]
        lines += [f"- {r['model']}: {r.get('error') or r.get('timeout')}".replace("|", "/") for r in bad]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", help="model names (default: the smallest of every family)")
    p.add_argument("--models-from", type=Path, help="the models of an earlier result's JSON (skips the picking)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per model (all three tuners)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="sweep_families")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.models_from is not None:
        models = [r["model"] for r in json.loads(args.models_from.read_text())["rows"]]
    else:
        models = args.models or timm_picks() + torchvision_picks()
    rows = []
    for i, name in enumerate(models):
        row = run_one(name, args.timeout)
        rows.append(row)
        states = " ".join(f"{t}={status_of(row, t)}" for t in TUNERS)
        print(f"[{i + 1}/{len(models)}] {name}: {states} ({row.get('seconds', 0):.1f} s)", file=sys.stderr)
    data = {
        "machine": describe_machine("cpu"),
        "command": "python bench/sweep_families.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summarise(rows),
        "rows": rows,
    }
    write_results(args.out, args.name, data, markdown(data))
    print(_headline(data["summary"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

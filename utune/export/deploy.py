"""Self-contained artifacts of any tuned model: ONNX (``utune export --onnx``) and ``torch.export`` programs
(``utune export --torch-export``, a ``.pt2`` file), which run without utune.

What folds is folded first: when every tuner folds into the base weights (LoRA, SSF, IA³, ...), the artifact
is the plain backbone with the merged weights (the same graph, and cost, as the untuned model); otherwise the
tuned graph is exported as it is, tuners included (U-Tuning's parallel adapters, VPT, prefix, bypass...), and
the result names the tuners it keeps. Both formats take any batch size (a dynamic first axis).

Before anything is written, the artifact is read back from its bytes and run (onnxruntime, or
``torch.export.load``) on two random batches of different sizes; its outputs must match the tuned model's
within 1e-4 of the output scale, or nothing is written. The artifact carries what a consumer needs
(:func:`deploy_metadata`): input size, mean/std, class names where known, the spec and utune's version (ONNX:
``metadata_props``; ``.pt2``: the ``extra_files`` entry ``utune.json``, a JSON object of the same strings).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from utune._version import __version__
from utune.errors import ExportError, UtuneError
from utune.export.io import check_target, write_bytes_atomic
from utune.export.merge import Verification, forward_eval, merged_state_dict, plain_model, relative_tolerance
from utune.spec import spec_hash, spec_to_yaml

if TYPE_CHECKING:
    from utune.engine.record import Built

FORMATS = ("onnx", "torch-export")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
META_FILE = "utune.json"  # the .pt2 extra file holding the metadata
OPSET = 18  # the opset torch's exporter targets by default; onnxruntime >= 1.14 runs it
BATCHES = (2, 3)  # verify at two batch sizes: the batch axis is dynamic, not traced as a constant
_MAX_BATCH = 1 << 16


@dataclass
class Deployable:
    """The module an artifact is made of: the plain model with merged weights, or the tuned graph."""

    module: nn.Module
    folded: list[str] = field(default_factory=list)  # rules folded into the weights ("rule (kind)")
    kept: list[str] = field(default_factory=list)  # rules exported as computation in the graph
    why_kept: str = ""  # why nothing was folded (the merge's refusal), when kept


def deployable(built: Built, *, fold: bool = True) -> Deployable:
    """Fold every tuner when all of them fold (and ``fold``); else the tuned graph itself, every tuner kept."""
    rules = [f"{r.name} ({r.kind})" for r in built.spec.tuners]
    if not rules:
        return Deployable(built.model)
    if not fold:
        return Deployable(built.model, kept=rules, why_kept="fold=False")
    try:
        merged = merged_state_dict(built)
    except UtuneError as e:
        return Deployable(built.model, kept=rules, why_kept=e.message.splitlines()[0])
    plain = plain_model(built)
    plain.load_state_dict(merged.state, strict=True)
    return Deployable(plain, folded=sorted({f"{rule} ({kind})" for rule, kind, _, _ in merged.folds}))


def class_names(built: Built, source: str | Path | None = None) -> list[str] | None:
    """Class names where utune knows them: the spec's ``model.class_names`` (a run records its dataset's),
    a tuner file's metadata (``utune.class_names``, a JSON list) or a ``classes.json`` beside a run (a list, or
    ``{"classes": [...]}``); None when nowhere (the artifact then has no ``class_names`` entry)."""
    names = built.spec.model.class_names
    if names:
        return [str(n) for n in names]
    if source is None:
        return None
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":  # a tuner file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("utune.class_names")
        data = json.loads(raw) if raw else None
        return [str(n) for n in data] if isinstance(data, list) and data else None
    candidates = [path / "classes.json", path / "class_names.json"] if path.is_dir() else []
    for c in candidates:
        try:
            data = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = data.get("classes", data.get("class_names")) if isinstance(data, dict) else data
        if isinstance(data, list) and data:
            return [str(n) for n in data]
    return None


def deploy_metadata(built: Built, fmt: str, dep: Deployable, names: list[str] | None) -> dict[str, str]:
    """What a consumer needs to feed the artifact and read its output, as strings (ONNX metadata_props)."""
    cfg = built.data_config
    meta = {
        "utune.format": f"{fmt}/1",
        "utune.version": __version__,
        "utune.base_model": built.model_label,
        "utune.spec": spec_to_yaml(built.spec),
        "utune.spec_hash": spec_hash(built.spec),
        "utune.folded": json.dumps(dep.folded),
        "utune.kept": json.dumps(dep.kept),
        "input_size": json.dumps(list(built.input_size)),  # C, H, W; the batch axis is dynamic
        "mean": json.dumps([float(v) for v in cfg.get("mean", ())]),
        "std": json.dumps([float(v) for v in cfg.get("std", ())]),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": json.dumps(float(cfg.get("crop_pct", 1.0))),
    }
    if names:
        meta["class_names"] = json.dumps(names, ensure_ascii=False)
    return meta


# ---- the two formats ---------------------------------------------------------------------------------------


def _example(built: Built, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *built.input_size, generator=torch.Generator().manual_seed(seed))


def _program(module: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` in eval mode with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    finally:
        module.train(was)


def _onnx_bytes(ep: torch.export.ExportedProgram, meta: Mapping[str, str]) -> bytes:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            ep, input_names=["input"], output_names=["output"], opset_version=OPSET, dynamo=True, verbose=False
        )
    if prog is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise ExportError("torch.onnx.export returned no program", hint="report this with the spec")
    proto = prog.model_proto
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name, proto.producer_version = "utune", __version__
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _pt2_bytes(ep: torch.export.ExportedProgram, meta: Mapping[str, str]) -> bytes:
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={META_FILE: json.dumps(dict(meta), ensure_ascii=False)})
    return buf.getvalue()


def _onnx_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def _pt2_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.export.load(io.BytesIO(data)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = module(x)
        return (out if isinstance(out, torch.Tensor) else out[0]).detach().float()

    return run


def verify_artifact(
    built: Built, run: Callable[[torch.Tensor], torch.Tensor], what: str, *, seed: int = 0
) -> Verification:
    """The artifact's outputs against the tuned model's on random batches of each size in :data:`BATCHES`."""
    diff = scale = 0.0
    for i, n in enumerate(BATCHES):
        x = _example(built, n, seed + i)
        tuned = forward_eval(built.model, x)
        got = run(x)
        if tuple(got.shape) != tuple(tuned.shape):
            raise ExportError(
                f"the {what} outputs shape {tuple(got.shape)} for a batch of {n}, the tuned model {tuple(tuned.shape)}",
                hint="nothing was written; report this with the spec",
            )
        diff = max(diff, float((tuned - got.float()).abs().max()))
        scale = max(scale, float(tuned.abs().max()))
    tol = relative_tolerance(built.model) * max(scale, 1e-6)
    return Verification(diff, scale, tol, diff <= tol, what=what)


def _cannot(fmt: str, built: Built, dep: Deployable, e: Exception) -> ExportError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    kinds = sorted({r.kind for r in built.spec.tuners})
    which = f"the tuned graph (kinds: {', '.join(kinds)})" if dep.kept else "the merged plain model"
    return ExportError(
        f"cannot export {which} as {fmt}: {type(e).__name__}: {first}",
        hint="nothing was written; export --tuners-only instead (`utune apply SPEC --tuners FILE` loads it)",
    )


def export_deployed(
    built: Built,
    fmt: str,
    path: Path | str,
    *,
    force: bool = False,
    verify: bool = True,
    source: str | Path | None = None,
    fold: bool = True,
) -> dict[str, Any]:
    """Write ``built`` as a self-contained ``onnx`` or ``torch-export`` artifact (see the module docstring).

    ``source``: the run or tuner file it came from (where class names are looked for); ``fold=False`` keeps
    mergeable tuners as computation too (to measure what folding saves)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown deployment format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    path = Path(path)
    check_target(path, force)
    if fmt == "onnx":
        _require_onnx()
    dep = deployable(built, fold=fold)
    meta = deploy_metadata(built, fmt, dep, class_names(built, source))
    try:
        ep = _program(dep.module, _example(built, BATCHES[0], 0))
        data = _onnx_bytes(ep, meta) if fmt == "onnx" else _pt2_bytes(ep, meta)
    except UtuneError:
        raise
    except Exception as e:  # torch.export / the ONNX exporter: their errors are many and untyped
        raise _cannot(fmt, built, dep, e) from None
    result: dict[str, Any] = {
        "path": str(path),
        "mode": fmt,
        "folded": dep.folded,
        "kept": dep.kept,
        "why_kept": dep.why_kept,
        "bytes": len(data),
        "metadata": sorted(meta),
    }
    if verify:
        runner = _onnx_runner(data) if fmt == "onnx" else _pt2_runner(data)
        what = "onnxruntime" if fmt == "onnx" else "torch.export"
        check = verify_artifact(built, runner, what)
        result["verify"] = check
        if not check.ok:
            raise ExportError(
                f"the {fmt} artifact does not reproduce the tuned model: {check.line()}",
                hint="nothing was written; report this with the spec (or pass --no-verify)",
            )
    write_bytes_atomic(path, data, force=force)
    return result


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"--onnx needs onnx, onnxscript and onnxruntime ({e.name} is not installed)",
            hint="pip install 'utune[deploy]'",
        ) from None


def read_metadata(path: Path | str) -> dict[str, str]:
    """The metadata an ONNX or ``.pt2`` artifact carries (strings, as written)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in model.metadata_props}
    extra = {META_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    return dict(json.loads(extra[META_FILE]))

"""The one entry point :func:`export` that writes any of the three formats (where the model comes from,
a run or a spec plus a tuner file, is :mod:`utune.runs`'s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utune._version import __version__
from utune.errors import ExportError, UserInputError
from utune.export.io import check_target, write_safetensors
from utune.export.merge import merged_state_dict, verify_merged
from utune.export.peft_format import export_peft
from utune.export.tuners_only import export_tuners
from utune.spec import spec_hash

if TYPE_CHECKING:
    from utune.engine.record import Built

MODES = ("merge", "tuners-only", "peft", "onnx", "torch-export")
DEFAULT_NAMES = {
    "merge": "merged.safetensors",
    "tuners-only": "tuners.safetensors",
    "peft": "peft",
    "onnx": "model.onnx",
    "torch-export": "model.pt2",
}


def export_merged(built: Built, path: Path, *, force: bool = False, verify: bool = True) -> dict[str, Any]:
    """Fold every tuner into the base weights, verify against the tuned model, write the plain state dict."""
    path = Path(path)
    check_target(path, force)
    merged = merged_state_dict(built)
    result: dict[str, Any] = {
        "path": str(path),
        "mode": "merge",
        "folds": len(merged.folds),
        "layers": merged.layers,
        "tensors": len(merged.state),
    }
    if verify:
        check = verify_merged(built, merged.state)
        result["verify"] = check
        if not check.ok:
            raise ExportError(
                f"the merged model does not reproduce the tuned model: {check.line()}",
                hint="nothing was written; report this with the spec (or pass --no-verify)",
            )
    m = built.spec.model
    meta = {
        "format": "pt",
        "utune.format": "merged/1",
        "utune.version": __version__,
        "utune.base_model": built.model_label,
        "utune.num_classes": json.dumps(m.num_classes),
        "utune.model_kwargs": json.dumps(dict(m.kwargs), sort_keys=True, default=str),
        "utune.spec_hash": spec_hash(built.spec),
        "utune.merged_rules": json.dumps(sorted({f"{rule} ({kind})" for rule, kind, _, _ in merged.folds})),
    }
    if m.class_names:
        meta["utune.class_names"] = json.dumps(m.class_names)
    result["bytes"] = write_safetensors(path, merged.state, meta, force=force)
    return result


def export(
    built: Built,
    mode: str,
    path: Path,
    *,
    force: bool = False,
    verify: bool = True,
    source: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``built`` as ``mode`` (merge | tuners-only | peft | onnx | torch-export) to ``path``; returns a
    summary dict. ``source``: the run it came from (where deployment formats look for class names)."""
    if mode == "merge":
        return export_merged(built, path, force=force, verify=verify)
    if mode == "tuners-only":
        return export_tuners(built, path, force=force)
    if mode == "peft":
        check_target(Path(path), force)
        return export_peft(built, path, force=force, verify=verify)
    if mode in ("onnx", "torch-export"):
        from utune.export.deploy import export_deployed  # torch.onnx is imported only when asked for

        return export_deployed(built, mode, path, force=force, verify=verify, source=source)
    raise UserInputError(f"unknown export mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")

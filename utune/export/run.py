"""Where an export's model comes from (a training run, or a spec plus a tuner file) and the one
entry point :func:`export` that writes any of the three formats."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import utune
from utune.errors import ExportError, UserInputError
from utune.export.io import check_target, write_safetensors
from utune.export.merge import merged_state_dict, verify_merged
from utune.export.peft_format import export_peft
from utune.export.tuners_only import export_tuners, load_tuners
from utune.spec import spec_hash

if TYPE_CHECKING:
    from utune.api import Built

MODES = ("merge", "tuners-only", "peft")
DEFAULT_NAMES = {"merge": "merged.safetensors", "tuners-only": "tuners.safetensors", "peft": "peft"}


def load_run(run_dir: Path | str | None = None, overrides: Sequence[str] = (), which: str = "latest") -> Built:
    """Rebuild a run's model from its ``spec.yaml`` and load its checkpoint's trainable tensors.

    ``run_dir`` None: the most recent run under ``runs/``. ``which``: ``latest`` or ``best``.
    """
    from utune.train.run import latest_run, restore_run

    run = Path(run_dir) if run_dir is not None else latest_run()
    return restore_run(run, list(overrides), which=which)


def load_source(
    source: Path | str | None,
    overrides: Sequence[str] = (),
    *,
    tuners: Path | str | None = None,
    which: str = "latest",
) -> Any:
    """A run directory (its checkpoint), or a spec file (plus a tuner file, when given)."""
    from utune.api import build

    if source is not None and str(source).endswith((".yaml", ".yml")):
        built = build(source, list(overrides))
        if tuners is not None:
            load_tuners(built, tuners)
        return built
    if tuners is not None:
        raise UserInputError(
            "--tuners goes with a spec file, not a run directory",
            hint="`utune export SPEC.yaml --tuners FILE --merge -o OUT`",
        )
    return load_run(source, overrides, which)


def default_output(source: Path | str | None, mode: str) -> Path:
    from utune.train.run import latest_run

    if source is not None and str(source).endswith((".yaml", ".yml")):
        raise UserInputError("exporting from a spec needs -o/--output")
    run = Path(source) if source is not None else latest_run()
    (run / "export").mkdir(exist_ok=True)
    return run / "export" / DEFAULT_NAMES[mode]


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
        "utune.version": utune.__version__,
        "utune.base_model": m.name,
        "utune.num_classes": json.dumps(m.num_classes),
        "utune.model_kwargs": json.dumps(dict(m.kwargs), sort_keys=True, default=str),
        "utune.spec_hash": spec_hash(built.spec),
        "utune.merged_rules": json.dumps(sorted({f"{rule} ({kind})" for rule, kind, _, _ in merged.folds})),
    }
    result["bytes"] = write_safetensors(path, merged.state, meta, force=force)
    return result


def export(built: Built, mode: str, path: Path, *, force: bool = False, verify: bool = True) -> dict[str, Any]:
    """Write ``built`` as ``mode`` (merge | tuners-only | peft) to ``path``; returns a summary dict."""
    if mode == "merge":
        return export_merged(built, path, force=force, verify=verify)
    if mode == "tuners-only":
        return export_tuners(built, path, force=force)
    if mode == "peft":
        check_target(Path(path), force)
        return export_peft(built, path, force=force, verify=verify)
    raise UserInputError(f"unknown export mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")

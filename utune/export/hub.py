"""Hub-ready export folders (``utune export --merge --folder`` / ``--tuners-only --folder``).

A merged folder is what timm writes for the Hugging Face Hub: ``model.safetensors`` (the plain state dict),
``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg`` with the data config),
so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (or ``hf-hub:`` once uploaded with
``huggingface_hub.upload_folder``) rebuilds the tuned model as a plain one. A tuner folder holds the
tuner-only file. Both carry ``utune_spec.yaml`` and a model card ``README.md`` (the method, the parameter
counts, the run's metrics, the commands that reproduce it). Written atomically, like every export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utune._version import __version__
from utune.export.io import publish_dir, safetensors_bytes
from utune.export.merge import merged_state_dict, plain_model, verify_merged
from utune.export.tuners_only import tuner_state, tuners_metadata
from utune.spec import spec_to_yaml

if TYPE_CHECKING:
    from utune.engine.record import Built

_WHAT = {
    "merge": "Plain weights: every tuner folded into the backbone, no extra inference cost.",
    "tuners-only": "The tuner tensors and the trainable base tensors only; they load onto the base model.",
}
_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv", "classifier",
             "fixed_input_size", "num_classes", "pool_size", "license")  # fmt: skip


def timm_config(built: Built) -> dict[str, Any] | None:
    """timm's ``config.json`` for the plain model (None for torchvision models, a user's factory or module:
    timm cannot load them)."""
    from utune.models import is_factory_name

    m = built.spec.model
    if built.given or m.name is None or m.name.startswith("torchvision:") or is_factory_name(m.name):
        return None
    plain = plain_model(built)
    cfg = dict(getattr(plain, "pretrained_cfg", None) or {})
    pretrained = {k: cfg[k] for k in _CFG_KEYS if cfg.get(k) is not None}
    pretrained.update({k: built.data_config[k] for k in ("input_size", "mean", "std") if k in built.data_config})
    pretrained["input_size"] = list(built.input_size)
    pretrained["num_classes"] = getattr(plain, "num_classes", m.num_classes)  # the tuned head's, not ImageNet's
    if m.class_names:  # timm keeps them: create_model("local-dir:...").pretrained_cfg["label_names"]
        pretrained["label_names"] = list(m.class_names)
    args = dict(m.kwargs)
    if m.img_size is not None:
        args["img_size"] = m.img_size
    return {
        "architecture": m.name.split(".")[0],
        "num_classes": getattr(plain, "num_classes", m.num_classes),
        "num_features": getattr(plain, "num_features", None),
        "model_args": args,
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained.items()},
    }


def model_card(built: Built, mode: str, run: Path | None) -> str:
    """A Hugging Face model card: YAML front matter, then what was trained and how to reproduce it."""
    r = built.report
    summary = (
        json.loads((run / "summary.json").read_text()) if run is not None and (run / "summary.json").is_file() else {}
    )
    rules = "\n".join(
        f"| `{t['name']}` | `{t['kind']}` | {t['placement']} | {len(t['sites'])} | {t['params']:,} |"
        for t in r["tuners"]
    )
    metrics = "\n".join(f"- {k}: {100 * v:.2f} %" for k, v in summary.items() if k.endswith("_acc") and v is not None)
    spec_source = f"{run}/spec.yaml" if run is not None else built.spec.source
    load = (
        'timm.create_model("local-dir:<this folder>", pretrained=True)'
        if mode == "merge"
        else "utune apply utune_spec.yaml --tuners tuners.safetensors"
    )
    return f"""---
library_name: {"timm" if mode == "merge" else "utune"}
tags: [image-classification, utune, peft, {r["model"].split(".")[0]}]
---

# {r["model"]} tuned with utune ({"merged" if mode == "merge" else "tuners only"})

{_WHAT[mode]}

| rule | kind | placement | sites | parameters |
|---|---|---|---:|---:|
{rules or "| (none) | | | | |"}

Trainable parameters: {r["trainable_params"]:,} of {r["total_params"]:,} ({r["trainable_pct"]:.4f} %).

## Metrics of the run

{metrics or "- (no run metrics: exported from a spec)"}

## Reproduce

```bash
utune apply {spec_source} --train
utune export RUN {"--merge" if mode == "merge" else "--tuners-only"} --folder
```

Load: `{load}`. Written by utune {__version__}; the resolved spec is `utune_spec.yaml`.
"""


def export_folder(built: Built, mode: str, folder: Path, *, run: Path | None = None, force: bool = False,
                  verify: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write the hub folder for ``mode`` (``merge`` or ``tuners-only``); returns a summary."""
    result: dict[str, Any] = {"path": str(folder), "mode": f"{mode} folder"}
    if mode == "merge":
        merged = merged_state_dict(built)
        if verify:
            result["verify"] = check = verify_merged(built, merged.state)
            if not check.ok:
                from utune.errors import ExportError

                raise ExportError(f"the merged model does not reproduce the tuned model: {check.line()}")
        files = {"model.safetensors": safetensors_bytes(merged.state, {"format": "pt"})}
        config = timm_config(built)
        if config is not None:
            files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        result.update(folds=len(merged.folds), layers=merged.layers, tensors=len(merged.state))
    else:
        tensors = tuner_state(built)
        meta = tuners_metadata(built, tensors, Path(folder) / "tuners.safetensors")
        files = {"tuners.safetensors": safetensors_bytes(tensors, meta)}
        result["tensors"] = len(tensors)
    files["utune_spec.yaml"] = spec_to_yaml(built.spec, relative_to=Path(folder)).encode()  # no local paths
    files["README.md"] = model_card(built, mode, run).encode()

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    publish_dir(folder, fill, force=force)
    result["bytes"] = sum(len(d) for d in files.values())
    result["files"] = sorted(files)
    return result

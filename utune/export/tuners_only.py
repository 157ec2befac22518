"""Tuner-only files (``utune export --tuners-only``) and loading them back (:func:`load_tuners`).

A safetensors file holding what training changed and nothing else, keyed by site names:

- ``<rule>/<site>/<tensor>`` for a tuner's tensors, e.g. ``lora/blocks.0.attn.qkv/branches.q.lora_A.weight``
  (rule names have no ``/``; the tensor's name inside the tuner module is a dotted attribute path);
- ``<name>`` for base parameters the spec's ``trainable:`` opened, e.g. ``head.weight`` (no ``/``);
- the same set as a training checkpoint (:func:`utune.train.checkpoint.trainable_state`): trainable
  parameters plus persistent buffers of the modules that own them.

Metadata (all strings): ``utune.format`` (``tuners/1``), ``utune.version``, ``utune.spec`` (the resolved
spec, :func:`utune.spec.spec_to_yaml`), ``utune.spec_hash`` (all of it), ``utune.tuners_hash`` (the part
that must match to load: model name, classes and kwargs, tuners, trainable), ``utune.base_model``,
``utune.base_fingerprint``, ``utune.sites`` (JSON: key -> module name, kind) and ``utune.tensors_sha256``
(a checksum of every tensor, so a damaged byte is caught, not loaded).

The base fingerprint is sha256 over the frozen base tensors (the state dict minus tuners and trainable
tensors) in name order: each tensor's name, shape, and 64 values at evenly spaced flat indices
``i * (n - 1) // 63`` as float64. Cheap (a few thousand numbers for ViT-B) and sensitive to any other
checkpoint of the same architecture, whose values differ everywhere; it does not see a single edited value
between the sampled positions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import utune
from utune.errors import CheckpointError, ExportError
from utune.export._sites import TunerSite, tuner_sites
from utune.export.io import read_safetensors, write_safetensors
from utune.graph.rewrite import TUNER_ROOT
from utune.spec import Spec, load_spec_text, spec_hash, spec_to_dict, spec_to_yaml
from utune.train.checkpoint import trainable_state

if TYPE_CHECKING:
    from utune.api import Built

FORMAT = "tuners/1"
FINGERPRINT_SAMPLES = 64
_EXPORT_HINT = "tuner files come from `utune export RUN --tuners-only`"


# ---- identities ------------------------------------------------------------------------------------------


def tuners_part(spec: Spec) -> dict[str, Any]:
    """What a tuner file depends on: the architecture, the tuners, what trains (not data, train, export).

    Options a kind declares ``runtime_only`` (LoRA's dropout) change no weight and are left out.
    """
    from utune.tuners.registry import get_kind

    d = spec_to_dict(spec)
    model = {k: d["model"].get(k) for k in ("name", "num_classes", "kwargs", "img_size")}
    rules = []
    for rule in d["tuners"]:
        skip = set(getattr(get_kind(rule["kind"]).Options, "runtime_only", ()))
        rules.append({k: v for k, v in rule.items() if k not in skip})
    return {"model": model, "tuners": rules, "trainable": d["trainable"]}


def tuners_hash(spec: Spec) -> str:
    canonical = json.dumps(tuners_part(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def base_fingerprint(model: nn.Module, skip: set[str] | None = None) -> str:
    """sha256 over names, shapes and a strided sample of the frozen base tensors (see the module doc)."""
    skip = set(trainable_state(model)) if skip is None else skip
    h = hashlib.sha256(b"utune-base-fingerprint-v1")
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(TUNER_ROOT + ".") or name in skip:
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        if n:
            k = min(n, FINGERPRINT_SAMPLES)
            idx = (torch.arange(k, device=flat.device) * (n - 1)) // max(k - 1, 1)
            h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- names -----------------------------------------------------------------------------------------------


def _key_map(built: Built) -> tuple[dict[str, str], list[TunerSite]]:
    """File key -> GraphModule name for every tensor of the trainable state."""
    sites = tuner_sites(built)
    by_module = {ts.module: ts for ts in sites}
    out: dict[str, str] = {}
    for name in trainable_state(built.model):
        if name.startswith(TUNER_ROOT + "."):
            module = next((m for m in by_module if name.startswith(m + ".")), None)
            if module is None:
                raise ExportError(f"trainable tensor {name} belongs to no known tuner site", hint="report this bug")
            out[f"{by_module[module].key}/{name[len(module) + 1 :]}"] = name
        else:
            out[name] = name
    return out, sites


def tuner_state(built: Built) -> dict[str, torch.Tensor]:
    """The trainable state keyed by site names (``<rule>/<site>/<tensor>``, base names as they are)."""
    keys, _ = _key_map(built)
    state = trainable_state(built.model)
    return {k: state[v].detach().to("cpu").clone() for k, v in keys.items()}


# ---- export ----------------------------------------------------------------------------------------------


def tuners_metadata(built: Built, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    spec: Spec = built.spec
    _, sites = _key_map(built)
    return {
        "format": "pt",
        "utune.format": FORMAT,
        "utune.version": utune.__version__,
        "utune.spec": spec_to_yaml(spec),
        "utune.spec_hash": spec_hash(spec),
        "utune.tuners_hash": tuners_hash(spec),
        "utune.base_model": spec.model.name,
        "utune.base_fingerprint": base_fingerprint(built.model),
        "utune.sites": json.dumps({ts.key: {"module": ts.module, "kind": ts.kind} for ts in sites}),
        "utune.tensors_sha256": tensors_checksum(tensors),
    }


def export_tuners(built: Built, path: Path, *, force: bool = False) -> dict[str, Any]:
    """Write the tuner-only file; returns a summary (path, tensors, parameters, bytes)."""
    tensors = tuner_state(built)
    size = write_safetensors(Path(path), tensors, tuners_metadata(built, tensors), force=force)
    n_params = sum(t.numel() for t in tensors.values())
    return {"path": str(path), "mode": "tuners-only", "tensors": len(tensors), "params": n_params, "bytes": size}


# ---- loading back ----------------------------------------------------------------------------------------


def _spec_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for k in ("name", "num_classes", "kwargs", "img_size"):
        if stored["model"].get(k) != current["model"].get(k):
            out.append(f"model.{k}: {stored['model'].get(k)!r} in the file, {current['model'].get(k)!r} in the spec")
    a = {r["name"]: r for r in stored["tuners"]}
    b = {r["name"]: r for r in current["tuners"]}
    out += [f"rule {n!r} is only in the file" for n in a if n not in b]
    out += [f"rule {n!r} is only in the spec" for n in b if n not in a]
    for n in a.keys() & b.keys():
        keys = sorted(set(a[n]) | set(b[n]))
        out += [
            f"rule {n!r}: {k} = {a[n].get(k)!r} in the file, {b[n].get(k)!r} in the spec"
            for k in keys
            if a[n].get(k) != b[n].get(k)
        ]
    if [r["name"] for r in stored["tuners"]] != [r["name"] for r in current["tuners"]] and a.keys() == b.keys():
        out.append("the rules are in another order")
    if stored["trainable"] != current["trainable"]:
        out.append(f"trainable: {stored['trainable']} in the file, {current['trainable']} in the spec")
    return out


def spec_differences(stored: Spec, current: Spec) -> list[str]:
    """What differs between two specs in what tuner weights depend on (empty: they load into each other)."""
    if tuners_hash(stored) == tuners_hash(current):
        return []
    return _spec_differences(tuners_part(stored), tuners_part(current)) or ["their tuners or trainable differ"]


def _check_spec(meta: dict[str, str], built: Built, path: Path) -> None:
    if meta.get("utune.tuners_hash") == tuners_hash(built.spec):
        return
    problems: list[str] = []
    try:
        stored = load_spec_text(meta.get("utune.spec", ""), f"{path} (embedded spec)", trusted=False)
        problems = _spec_differences(tuners_part(stored), tuners_part(built.spec))
    except Exception:  # an embedded spec this utune cannot read: the hashes still decide
        problems = []
    detail = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise CheckpointError(
        f"{path} was exported for another spec" + (f": {detail}" if detail else " (its tuners or trainable differ)"),
        hint="build with the spec the tuners were trained with (the file holds it: `utune export` wrote it "
        "under the metadata key utune.spec)",
    )


def read_tuners(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a tuner file, checked to be one and undamaged."""
    path = Path(path)
    tensors, meta = read_safetensors(path, "tuner file")
    fmt = meta.get("utune.format")
    if fmt is None:
        raise CheckpointError(f"{path} is not a utune tuner file (it has no utune metadata)", hint=_EXPORT_HINT)
    if fmt.startswith("merged/"):
        raise CheckpointError(
            f"{path} holds merged weights, not tuners",
            hint="load it as the base weights (model.pretrained: FILE, or load_state_dict on the plain model)",
        )
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path} has format {fmt!r}; this utune ({utune.__version__}) reads {FORMAT!r}",
            hint=f"it was written by utune {meta.get('utune.version', '?')}; use that version or export again",
        )
    if meta.get("utune.tensors_sha256") != tensors_checksum(tensors):
        raise CheckpointError(
            f"tuner file {path} is corrupt: its tensors do not match their checksum",
            hint="export it again; the copy was damaged",
        )
    return tensors, meta


def load_tuners(built: Built, path: Path | str, *, check_base: bool = True) -> dict[str, Any]:
    """Load a tuner file into ``built.model`` (in place), strictly; returns what the file says about itself.

    Refused with a CheckpointError (exit 2): a missing, truncated, corrupt or foreign file; another base
    model; another spec (tuners, trainable, model name/classes/kwargs); other base weights (fingerprint;
    ``check_base=False`` skips only this check); missing, unexpected or misshaped tensors.
    """
    path = Path(path)
    tensors, meta = read_tuners(path)
    name = built.spec.model.name
    if meta.get("utune.base_model") != name:
        raise CheckpointError(
            f"{path} holds tuners for {meta.get('utune.base_model')!r}, the spec builds {name!r}",
            hint="use the spec the tuners were trained with",
        )
    _check_spec(meta, built, path)
    keys, _ = _key_map(built)
    if check_base and meta.get("utune.base_fingerprint") != base_fingerprint(built.model, set(keys.values())):
        raise CheckpointError(
            f"{path} was trained on other base weights of {name} (the base fingerprint differs)",
            hint="load the same pretrained weights as in training (model.pretrained in the spec)",
        )
    missing = sorted(set(keys) - set(tensors))
    unexpected = sorted(set(tensors) - set(keys))
    if missing or unexpected:
        parts = [f"missing {len(missing)} ({', '.join(missing[:3])})"] if missing else []
        parts += [f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])})"] if unexpected else []
        raise CheckpointError(
            f"{path} does not match the model's tuners: {'; '.join(parts)}",
            hint="build with the spec the tuners were trained with",
        )
    live = trainable_state(built.model)
    for key, gm_name in keys.items():
        src, dst = tensors[key], live[gm_name]
        if src.shape != dst.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}",
                hint="build with the spec the tuners were trained with",
            )
    with torch.no_grad():
        for key, gm_name in keys.items():
            live[gm_name].copy_(tensors[key].to(dtype=live[gm_name].dtype, device=live[gm_name].device))
    return {
        "path": str(path),
        "tensors": len(tensors),
        "utune_version": meta.get("utune.version"),
        "spec_hash": meta.get("utune.spec_hash"),
        "base_model": meta.get("utune.base_model"),
    }

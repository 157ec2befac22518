"""Hugging Face PEFT LoRA folders (``utune export --format peft``).

Writes what ``PeftModel.save_pretrained`` writes for a LoRA model (format of PEFT 0.21):

- ``adapter_config.json``: ``peft_type: LORA``, ``r``/``lora_alpha`` (the most common over the layers, the
  others in ``rank_pattern``/``alpha_pattern`` keyed by the escaped module path), ``target_modules`` (full
  module paths), ``modules_to_save`` (modules owning parameters the spec made trainable, e.g. ``head``);
- ``adapter_model.safetensors``: ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight`` and, for each
  module to save, its full state as ``base_model.model.<module>.<tensor>``.

``PeftModel.from_pretrained(timm.create_model(name, num_classes=K), folder)`` then computes what the utune
model computes (same scaling ``alpha / r``, same A/B shapes for Linear and Conv2d). A LoRA with ``slices`` on a
fused qkv becomes one PEFT LoRA on the whole layer: rank ``R = Σ r_s``, ``A`` the slices' A stacked, ``B`` a
block matrix holding each slice's B in its output third (zero rows for the frozen thirds), alpha ``s · R``
so that PEFT's ``(alpha / R) B A`` is utune's delta. Refused, with the reason: any tuner that is not LoRA; a
dilated Conv2d (PEFT's conv ``lora_A`` has no dilation); a grouped Conv2d (PEFT's grouped LoRA has a dense
``lora_A``, utune's one pair per group); a layer called more than once; a trainable parameter
on the model itself; and names PEFT would match ambiguously (it picks ``target_modules`` by ``.``-suffix and
``modules_to_save`` by plain suffix, so ``norm`` would also pick ``fc_norm``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from utune._version import __version__
from utune.errors import ExportError
from utune.export._sites import TunerSite, refusal, tuner_sites
from utune.export.io import publish_dir, safetensors_bytes
from utune.export.merge import Verification, _Graph, forward_eval, plain_model, relative_tolerance
from utune.graph.mha import PackedLinear
from utune.graph.rewrite import TUNER_ROOT
from utune.spec import spec_hash
from utune.train.checkpoint import trainable_state
from utune.tuners.lora import SLICES, Lora

if TYPE_CHECKING:
    from utune.engine.record import Built

ADAPTER_CONFIG = "adapter_config.json"
CLASS_NAMES = "class_names.json"  # the names of the outputs, in order (when the run recorded them)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_HINT = "export with --tuners-only (utune's own format) or --merge, or keep to plain LoRA rules for PEFT"


def _most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


def _number(x: float) -> float | int:
    """``x`` as an int when it is one up to float rounding (``alpha = (alpha_u / r_u) · R`` may be 7.999...)."""
    r = round(x)
    return int(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else float(x)


def _peft_lora(m: Lora) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, alpha)`` of the PEFT LoRA equal to ``m``: ``(alpha / R) · B A = m.delta_weight()``.

    Slices: ``A = [A_q; A_v]`` (R x in), ``B`` (3C x R) with ``B_q`` in rows ``0:C``, columns ``0:r_q``,
    ``B_v`` in rows ``2C:3C``, columns ``r_q:R``, zeros elsewhere (the frozen k third gets no delta).
    """
    if m.slices is None:
        a, b = m.branch.lora_A.weight.detach(), m.branch.lora_B.weight.detach()
        return a, b, m.scaling * a.shape[0]
    thirds = [(i, m.slice(s)) for i, s in enumerate(SLICES) if s in m.branches]  # A rows follow B columns
    a = torch.cat([br.lora_A.weight.detach() for _, br in thirds])
    b = thirds[0][1].lora_B.weight.new_zeros(3 * m.part, a.shape[0])
    col = 0
    for i, br in thirds:
        rank = br.lora_A.weight.shape[0]  # each slice's own rank, so slices of different ranks stack too
        b[i * m.part : (i + 1) * m.part, col : col + rank] = br.lora_B.weight.detach()
        col += rank
    return a, b, m.scaling * a.shape[0]  # PEFT scales by alpha / R, utune by m.scaling


def _lora_layers(built: Built) -> tuple[dict[str, tuple[TunerSite, Lora]], list[tuple[TunerSite, str]]]:
    gm = built.model
    g = _Graph(gm)
    layers: dict[str, tuple[TunerSite, Lora]] = {}
    refused: list[tuple[TunerSite, str]] = []
    for ts in tuner_sites(built):
        mod = gm.get_submodule(ts.module)
        if not isinstance(mod, Lora):
            refused.append((ts, "PEFT's LoRA format holds only LoRA tuners"))
        elif "@" in ts.site or len(g.calls.get(ts.site, [])) != 1:
            refused.append((ts, "the layer is called more than once; PEFT would change every call"))
        elif isinstance(gm.get_submodule(ts.site), PackedLinear):
            refused.append((ts, "PEFT puts LoRA on a MultiheadAttention as a whole (in_proj and out_proj), not on "
                                "its packed in_proj alone"))  # fmt: skip
        elif ts.site in layers:
            refused.append((ts, f"rule {layers[ts.site][0].rule!r} already puts a LoRA on this layer"))
        else:
            base = gm.get_submodule(ts.site)
            if isinstance(base, nn.Conv2d) and tuple(base.dilation) != (1, 1):
                refused.append((ts, f"the conv is dilated {tuple(base.dilation)}; PEFT's conv lora_A is not"))
            elif isinstance(base, nn.Conv2d) and base.groups != 1:  # PEFT's lora_A is dense, utune's per group
                refused.append((ts, f"the conv is grouped (groups={base.groups}); PEFT's grouped LoRA is another form"))
            else:
                layers[ts.site] = (ts, mod)
    return layers, refused


def _modules_to_save(built: Built, targets: list[str]) -> tuple[list[str], list[str]]:
    names = [k for k in trainable_state(built.model) if not k.startswith(TUNER_ROOT + ".")]
    owners = sorted({k.rpartition(".")[0] for k in names})
    problems = [f"trainable {k} sits on the model itself; PEFT saves whole submodules" for k in names if "." not in k]
    owners = [o for o in owners if o and not any(o.startswith(p + ".") for p in owners if p)]
    all_modules = [n for n, _ in built.base.named_modules() if n]
    for o in owners:
        clash = next((n for n in all_modules if n != o and n.endswith(o)), None)
        if clash:
            problems.append(f"modules_to_save {o!r} would also pick {clash} (PEFT matches it as a name suffix)")
        for t in targets:
            if t == o or t.startswith(o + ".") or o.startswith(t + "."):
                problems.append(f"LoRA layer {t} overlaps the trainable module {o}; PEFT cannot do both")
    for t in targets:
        clash = next((n for n in all_modules if n != t and n.endswith("." + t)), None)
        if clash:
            problems.append(f"target {t!r} would also pick {clash} (PEFT matches targets by suffix)")
    return owners, problems


def peft_adapter(built: Built) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, adapter tensors)`` for the PEFT folder; ExportError naming whatever PEFT cannot hold."""
    layers, refused = _lora_layers(built)
    targets = sorted(layers)
    owners, problems = _modules_to_save(built, targets)
    if refused or problems:
        if refused:
            err = refusal("cannot express these tuners in PEFT's LoRA format", refused, _HINT)
            msg = err.message + ("\n" + "\n".join(f"  - {p}" for p in problems) if problems else "")
        else:
            msg = "cannot express this model in PEFT's LoRA format:\n" + "\n".join(f"  - {p}" for p in problems)
        raise ExportError(msg, hint=_HINT)
    peft = {p: _peft_lora(m) for p, (_, m) in layers.items()}
    ranks = {p: int(a.shape[0]) for p, (a, _, _) in peft.items()}
    alphas = {p: _number(alpha) for p, (_, _, alpha) in peft.items()}
    drops = [float(getattr(m.dropout, "p", 0.0)) for _, m in layers.values()]
    r = _most_common(list(ranks.values()), 8)
    alpha = _most_common(list(alphas.values()), r)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "auto_mapping": {"base_model_class": type(built.base).__name__, "parent_library": type(built.base).__module__},
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(drops, 0.0),
        "target_modules": targets,
        "modules_to_save": owners or None,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for p, (a, b, _) in peft.items():
        tensors[f"{PREFIX}{p}.lora_A.weight"] = a
        tensors[f"{PREFIX}{p}.lora_B.weight"] = b
    for o in owners:
        for k, v in built.base.get_submodule(o).state_dict().items():
            tensors[f"{PREFIX}{o}.{k}"] = v.detach()
    return config, tensors


def verify_peft(built: Built, folder: Path, owners: list[str], *, batch: int = 2, seed: int = 0) -> Verification | None:
    """Load ``folder`` with PEFT onto a plain model holding the base weights; compare outputs. None without peft."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    plain = plain_model(built)
    plain.load_state_dict(built.base.state_dict(), strict=True)
    with torch.no_grad():  # the trained modules must come from the folder, not from this copy
        for o in owners:
            for t in plain.get_submodule(o).state_dict().values():
                if t.is_floating_point():
                    t.zero_()
    peft_model = PeftModel.from_pretrained(plain, str(folder))
    x = torch.randn(batch, *built.input_size, generator=torch.Generator().manual_seed(seed))
    tuned, got = forward_eval(built.model, x), forward_eval(peft_model, x)
    diff, scale = float((tuned - got).abs().max()), float(tuned.abs().max())
    tol = relative_tolerance(built.model) * max(scale, 1e-6)
    return Verification(diff, scale, tol, diff <= tol)


def export_peft(built: Built, folder: Path, *, force: bool = False, verify: bool = True) -> dict[str, Any]:
    """Write the PEFT folder atomically (verified with PEFT first when it is installed); returns a summary."""
    folder = Path(folder)
    config, tensors = peft_adapter(built)
    meta = {
        "format": "pt",
        "utune.version": __version__,
        "utune.spec_hash": spec_hash(built.spec),
        "utune.base_model": built.model_label,
    }
    names = built.spec.model.class_names
    if names:  # PEFT's adapter_config.json takes no extra keys (it warns): the weights' metadata and a file
        meta["utune.class_names"] = json.dumps(names)
    data = safetensors_bytes(tensors, meta)
    result: dict[str, Any] = {
        "path": str(folder),
        "mode": "peft",
        "tensors": len(tensors),
        "bytes": len(data),
        "layers": len(config["target_modules"]),
        "modules_to_save": config["modules_to_save"],
    }

    def fill(tmp: Path) -> None:
        (tmp / ADAPTER_WEIGHTS).write_bytes(data)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if names:
            (tmp / CLASS_NAMES).write_text(json.dumps(names, indent=2) + "\n")
        if verify:
            check = verify_peft(built, tmp, config["modules_to_save"] or [])
            result["verify"] = check
            if check is not None and not check.ok:
                raise ExportError(
                    f"PEFT's model does not reproduce the tuned model: {check.line()}",
                    hint="nothing was written; report this with the spec (or pass --no-verify)",
                )

    publish_dir(folder, fill, force=force)
    return result

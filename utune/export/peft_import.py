"""Hugging Face PEFT adapter folders -> a utune spec and tuner file (``utune import-peft``).

A LoRA folder (``peft_type: LORA``): every ``<layer>.lora_A.weight``/``lora_B.weight`` pair becomes a utune
``lora`` site with the same A and B; the scaling PEFT applies (``lora_alpha / r``, ``/ sqrt(r)`` with
rsLoRA, ``alpha_pattern``/``rank_pattern`` per layer) becomes utune's ``alpha`` (utune scales by
``alpha / rank``); layers of one rank and scaling form one rule. An IA³ folder: ``ia3_l`` of shape
``(out, 1)`` scales the layer's output (``ia3``), ``(1, in)`` its input (PEFT's feed-forward layers:
``ia3`` with ``tap: input``). ``modules_to_save`` become ``trainable:`` with their tensors. The result is
built on the given base model, compared with PEFT's own model when peft is installed (refused above
1e-5 of the output scale), and written as a tuner-only file with its spec beside it.

Refused, with the reason: other PEFT types, DoRA (``use_dora``), ``fan_in_fan_out``, trained biases
(``bias`` other than ``none``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from utune.errors import ExportError, UserInputError
from utune.export.io import read_safetensors
from utune.export.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from utune.export.tuners_only import _key_map

if TYPE_CHECKING:
    from utune.engine.record import Built

_HINT = "convert LoRA or IA3 adapters trained without DoRA, fan_in_fan_out or trained biases"


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserInputError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})", hint="pass the folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {config_path}: {e}", hint="the folder may be damaged") from None
    tensors, _ = read_safetensors(folder / ADAPTER_WEIGHTS, "PEFT adapter weights")
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's per-layer override: the first pattern ``(.*\\.)?(pattern)$`` that matches the layer path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check(config: dict[str, Any]) -> str:
    kind = str(config.get("peft_type", "")).upper()
    why = None
    if kind not in ("LORA", "IA3"):
        why = f"its peft_type is {config.get('peft_type')!r}; utune imports LORA and IA3"
    elif config.get("use_dora"):
        why = "it is DoRA (use_dora: true)"
    elif config.get("fan_in_fan_out"):
        why = "fan_in_fan_out is set (transposed Conv1D weights, not timm's Linear)"
    elif config.get("bias", "none") != "none":
        why = f"it trains biases (bias: {config.get('bias')})"
    if why:
        raise ExportError(f"cannot import this PEFT adapter: {why}", hint=_HINT)
    return kind


def _lora_rules(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[list[dict], dict[str, Any]]:
    """utune lora rules (one per rank and scaling) and the tensors keyed ``rule/site/tensor``."""
    groups: dict[tuple[int, float], list[str]] = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        path = key.removesuffix(".lora_A.weight")
        rank = int(tensors[key].shape[0])
        alpha = float(_pattern(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank)))
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        groups.setdefault((rank, round(scaling * rank, 12)), []).append(path)
    rules, files = [], {}
    for i, ((rank, alpha), paths) in enumerate(sorted(groups.items())):
        name = "lora" if i == 0 else f"lora_{i + 1}"
        rule: dict[str, Any] = {"name": name, "kind": "lora", "at": paths, "rank": rank}
        if alpha != rank:
            rule["alpha"] = alpha
        if config.get("lora_dropout"):
            rule["dropout"] = float(config["lora_dropout"])
        rules.append(rule)
        for p in paths:
            files[f"{name}/{p}/branch.lora_A.weight"] = tensors[f"{p}.lora_A.weight"]
            files[f"{name}/{p}/branch.lora_B.weight"] = tensors[f"{p}.lora_B.weight"]
    return rules, files


def _ia3_rules(tensors: dict[str, torch.Tensor]) -> tuple[list[dict], dict[str, Any]]:
    out: list[str] = []
    inp: list[str] = []
    for key in sorted(k for k in tensors if k.endswith(".ia3_l")):
        (inp if tensors[key].shape[0] == 1 else out).append(key.removesuffix(".ia3_l"))
    rules, files = [], {}
    for name, paths, tap in (("ia3", out, "output"), ("ia3_input", inp, "input")):
        if paths:
            rules.append({"name": name, "kind": "ia3", "at": paths, **({"tap": "input"} if tap == "input" else {})})
            files.update({f"{name}/{p}/scale": tensors[f"{p}.ia3_l"].flatten() for p in paths})
    return rules, files


def peft_to_spec(folder: Path | str, model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The utune spec (a dict, ``model`` as its model section) and the tuner tensors keyed like a tuner file."""
    config, tensors = _read(Path(folder))
    kind = _check(config)
    rules, files = _lora_rules(config, tensors) if kind == "LORA" else _ia3_rules(tensors)
    if not rules:
        raise ExportError(f"{folder} holds no {kind} tensors", hint="pass a folder PEFT's save_pretrained wrote")
    marker = ".lora_" if kind == "LORA" else ".ia3_l"
    saved = {k: v for k, v in tensors.items() if marker not in k}
    owners = sorted({k.rpartition(".")[0] for k in saved})
    files.update(saved)
    spec = {"version": 1, "model": dict(model), "tuners": rules, "trainable": owners}
    return spec, files


def load_into(built: Built, files: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the converted tensors into ``built``'s tuners (strictly: every key, every shape)."""
    keys, _ = _key_map(built)
    missing, unexpected = sorted(set(keys) - set(files)), sorted(set(files) - set(keys))
    if missing or unexpected:
        raise ExportError(
            f"the PEFT tensors of {folder} do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}",
            hint="check --model and --num-classes are the model the adapter was trained on",
        )
    params = dict(built.model.named_parameters())
    buffers = dict(built.model.named_buffers())
    with torch.no_grad():
        for key, name in keys.items():
            target = params.get(name, buffers.get(name))
            src = files[key]
            if target is None or tuple(target.shape) != tuple(src.shape):
                got = None if target is None else tuple(target.shape)
                raise ExportError(f"{key}: {tuple(src.shape)} in {folder}, {got} in the model", hint=_HINT)
            target.copy_(src.to(target.dtype))


def verify_with_peft(built: Built, folder: Path) -> Any:
    """PEFT's model of the same folder on the same base weights must compute what utune's does."""
    from utune.export.peft_format import verify_peft

    check = verify_peft(built, folder, [t for t in built.spec.trainable if isinstance(t, str)])  # modules_to_save
    if check is not None and not check.ok:
        raise ExportError(f"the imported tuners do not reproduce PEFT's model: {check.line()}", hint=_HINT)
    return check

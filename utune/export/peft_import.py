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
import os
import re
import tempfile
import time
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


MAX_RANK = 1 << 16  # a LoRA rank beyond any layer's width: refused before anything is sized by it
MAX_PATTERN = 256  # characters of one alpha_pattern / rank_pattern / target_modules regex
# the time all pattern matches of one folder may take together: the regex engine needs microseconds for
# every real pattern (and for patterns that take Python's re hours); 5 s leaves room on a loaded machine
MATCH_SECONDS = 5.0


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserInputError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})", hint="pass the folder")
    try:
        config = json.loads(config_path.read_bytes()[: 1 << 20].decode("utf-8", errors="replace"))
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {config_path}: {e}", hint="the folder may be damaged") from None
    if not isinstance(config, dict):
        raise UserInputError(
            f"{config_path} is not a PEFT adapter config: it holds {_json_type(config)}, not a JSON object",
            hint="pass a folder PEFT's save_pretrained wrote",
        )
    tensors, _ = read_safetensors(folder / ADAPTER_WEIGHTS, "PEFT adapter weights")
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _bad(config_path: str, key: str, value: Any, want: str) -> ExportError:
    shown = json.dumps(value)[:80]
    return ExportError(
        f"{config_path}: {key} is {shown}; it must be {want}", hint="pass a folder PEFT's save_pretrained wrote"
    )


def _number(config: dict[str, Any], key: str, *, default: float | None, low: float, high: float) -> float | None:
    """``config[key]`` as a finite number in ``[low, high]`` (``default`` when absent)."""
    if key not in config:
        return default
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low <= value <= high):
        raise _bad(ADAPTER_CONFIG, key, value, f"a number from {low:g} to {high:g}")
    return float(value)


def _check_config(config: dict[str, Any]) -> None:
    """Every key utune reads, typed and bounded, before anything is matched, sized or built from it."""
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise _bad(ADAPTER_CONFIG, "r", r, f"a whole number from 1 to {MAX_RANK}")
    _number(config, "lora_alpha", default=None, low=-1e6, high=1e6)
    _number(config, "lora_dropout", default=0.0, low=0.0, high=0.999)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in config and not isinstance(config[key], bool | None):
            raise _bad(ADAPTER_CONFIG, key, config[key], "true or false")
    for key, want in (("alpha_pattern", "a number"), ("rank_pattern", f"a whole number from 1 to {MAX_RANK}")):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise _bad(ADAPTER_CONFIG, key, patterns, "an object of regex: value")
        for pattern, value in patterns.items():
            _check_regex(key, pattern)
            ok = not isinstance(value, bool) and (
                isinstance(value, int) and 1 <= value <= MAX_RANK
                if key == "rank_pattern"
                else isinstance(value, int | float) and math.isfinite(value)
            )
            if not ok:
                raise _bad(ADAPTER_CONFIG, f"{key}[{pattern!r}]", value, want)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex("target_modules", targets)
    elif targets is not None:
        if not isinstance(targets, list) or not all(isinstance(t, str) and _plain_path(t) for t in targets):
            raise _bad(ADAPTER_CONFIG, "target_modules", targets, "a list of module names (no / or ..) or a regex")
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(t, str) and _plain_path(t) for t in saved)
    ):
        raise _bad(ADAPTER_CONFIG, "modules_to_save", saved, "a list of module names (no / or ..)")


def _plain_path(name: str) -> bool:
    """A module name or dotted path: no separators, no empty or ``..`` parts."""
    return (
        bool(name) and len(name) <= MAX_PATTERN and re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", name) is not None
    )


def _check_regex(key: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise _bad(ADAPTER_CONFIG, key, pattern, f"regexes of 1 to {MAX_PATTERN} characters")
    try:
        re.compile(pattern)
    except re.error as e:
        raise _bad(ADAPTER_CONFIG, key, pattern, f"a valid regex ({e})") from None


class _Matcher:
    """PEFT's per-layer override (the first pattern ``(.*\\.)?(pattern)$`` that matches the layer path),
    matched by the ``regex`` module under one time budget: a catastrophic-backtracking pattern from the
    file's author is refused instead of hanging the import."""

    def __init__(self) -> None:
        import regex  # noqa: F401  (imported before the clock starts)

        self.deadline = time.monotonic() + MATCH_SECONDS

    def __call__(self, key: str, patterns: dict[str, Any], path: str, default: Any) -> Any:
        import regex

        for pattern, value in patterns.items():
            left = self.deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                if regex.match(rf"(.*\.)?({pattern})$", path, timeout=left):
                    return value
            except regex.error as e:  # a pattern Python's re compiles but this engine does not
                raise ExportError(
                    f"{ADAPTER_CONFIG}: {key} pattern {pattern!r} cannot be matched safely ({e})",
                    hint="write the pattern as plain layer names (e.g. blocks\\.0\\.attn\\.qkv)",
                ) from None
            except TimeoutError:
                raise ExportError(
                    f"{ADAPTER_CONFIG}: {key} pattern {pattern!r} takes more than {MATCH_SECONDS:g} s to match "
                    "the layer names (a catastrophic-backtracking regex)",
                    hint="write the pattern as plain layer names (e.g. blocks\\.0\\.attn\\.qkv)",
                ) from None
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


def _lora_pairs(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The layer paths with a LoRA pair, each A ``(rank, in...)`` and B ``(out, rank...)`` checked."""
    a_keys = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    b_keys = {k.removesuffix(".lora_B.weight") for k in tensors if k.endswith(".lora_B.weight")}
    for path in sorted(a_keys ^ b_keys):
        has, lacks = ("lora_A", "lora_B") if path in a_keys else ("lora_B", "lora_A")
        raise ExportError(f"{ADAPTER_WEIGHTS}: {path} has {has} but no {lacks}", hint="the folder is incomplete")
    for path in sorted(a_keys):
        a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        if a.dim() < 2 or b.dim() < 2:
            raise ExportError(
                f"{ADAPTER_WEIGHTS}: {path}.lora_{'A' if a.dim() < 2 else 'B'}.weight has shape "
                f"{tuple(a.shape if a.dim() < 2 else b.shape)}; LoRA matrices have at least 2 dimensions",
                hint="the folder is damaged or not a LoRA adapter",
            )
        if a.shape[0] < 1 or b.shape[1] != a.shape[0]:
            raise ExportError(
                f"{ADAPTER_WEIGHTS}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: their rank "
                "must be the same and at least 1",
                hint="the folder is damaged",
            )
    return sorted(a_keys)


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ExportError(
                f"{ADAPTER_WEIGHTS}: {key} holds {t.dtype} values, not floats", hint="the folder is damaged"
            )
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ExportError(
                f"{ADAPTER_WEIGHTS}: {key} holds NaN or inf values", hint="the adapter's training diverged"
            )


def _lora_rules(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[list[dict], dict[str, Any]]:
    """utune lora rules (one per rank and scaling) and the tensors keyed ``rule/site/tensor``."""
    groups: dict[tuple[int, float], list[str]] = {}
    match = _Matcher()
    for path in _lora_pairs(tensors):
        rank = int(tensors[f"{path}.lora_A.weight"].shape[0])
        declared = match("rank_pattern", config.get("rank_pattern") or {}, path, config.get("r", 8))
        if declared != rank:
            raise ExportError(
                f"{ADAPTER_WEIGHTS}: {path}.lora_A.weight has rank {rank}, {ADAPTER_CONFIG} says {declared} "
                "(r, rank_pattern)",
                hint="the folder's config and weights do not belong together",
            )
        alpha = float(match("alpha_pattern", config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank)))
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
        if tensors[key].dim() != 2 or 1 not in tensors[key].shape:
            raise ExportError(
                f"{ADAPTER_WEIGHTS}: {key} has shape {tuple(tensors[key].shape)}; IA3 scales are (out, 1) or (1, in)",
                hint="the folder is damaged or not an IA3 adapter",
            )
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
    _check_config(config)
    _check_tensors(tensors)
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


def _explicit_config(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The folder's config with every pattern replaced by the layer paths it resolved to: PEFT matches
    patterns with Python's backtracking ``re``, so the author's own regexes never reach it."""
    cleared: dict[str, Any] = {k: None for k in ("layers_to_transform", "layers_pattern") if k in config}
    explicit: dict[str, Any] = {**config, **cleared}
    if str(config.get("peft_type", "")).upper() == "LORA":
        paths = _lora_pairs(tensors)
        match = _Matcher()
        ranks = {p: int(tensors[f"{p}.lora_A.weight"].shape[0]) for p in paths}
        alphas = {
            p: match("alpha_pattern", config.get("alpha_pattern") or {}, p, config.get("lora_alpha", ranks[p]))
            for p in paths
        }
        explicit.update(
            target_modules=paths,
            rank_pattern={re.escape(p): r for p, r in ranks.items()},
            alpha_pattern={re.escape(p): a for p, a in alphas.items()},
        )
    else:
        paths = sorted(k.removesuffix(".ia3_l") for k in tensors if k.endswith(".ia3_l"))
        explicit.update(
            target_modules=paths, feedforward_modules=[p for p in paths if tensors[f"{p}.ia3_l"].shape[0] == 1]
        )
    return explicit


def verify_with_peft(built: Built, folder: Path) -> Any:
    """PEFT's model of the same folder on the same base weights must compute what utune's does."""
    from utune.export.peft_format import verify_peft

    config, tensors = _read(Path(folder))
    with tempfile.TemporaryDirectory(prefix="utune-peft-") as tmp:
        (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(_explicit_config(config, tensors)))
        os.symlink(Path(folder, ADAPTER_WEIGHTS).resolve(), Path(tmp) / ADAPTER_WEIGHTS)
        owners = [t for t in built.spec.trainable if isinstance(t, str)]  # modules_to_save
        check = verify_peft(built, Path(tmp), owners)
    if check is not None and not check.ok:
        raise ExportError(f"the imported tuners do not reproduce PEFT's model: {check.line()}", hint=_HINT)
    return check

"""The methods the benchmarks compare, as utune specs (rules + trainable globs) for a timm ViT."""

from __future__ import annotations

from typing import Any

METHODS: dict[str, dict[str, Any]] = {
    "full": {"tuners": [], "trainable": ["**"]},
    "linear": {"tuners": [], "trainable": ["head"]},
    "lora": {"tuners": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 8}], "trainable": ["head"]},
    "adapter": {
        "tuners": [
            {"name": "ffn", "kind": "adapter", "at": "blocks.*.mlp", "placement": "sequential", "scale": "none"}
        ],
        "trainable": ["head"],
    },
    "prefix": {"tuners": [{"name": "prefix", "kind": "prefix", "at": "blocks.*.attn"}], "trainable": ["head"]},
    "vpt_deep": {"tuners": [{"name": "vpt", "kind": "prompt", "at": "blocks.*"}], "trainable": ["head"]},
    "utuning_dual": {
        "tuners": [
            {"name": "mha", "kind": "adapter", "at": "blocks.*.attn", "tap": "parent.input"},
            {"name": "ffn", "kind": "adapter", "at": "blocks.*.mlp"},
        ],
        "trainable": ["head"],
    },
    "utuning_tri": {
        "tuners": [
            {"name": "mha", "kind": "adapter", "at": "blocks.*.attn", "tap": "parent.input"},
            {"name": "ffn", "kind": "adapter", "at": "blocks.*.mlp"},
            {"name": "blk", "kind": "prefix", "at": "blocks.*", "placement": "parallel", "scale": "none"},
        ],
        "trainable": ["head"],
    },
    "bypass": {"tuners": [{"name": "bypass", "kind": "bypass", "at": "blocks.*"}], "trainable": ["head"]},
    # Res-Tuning-Bypass with its memory options (issue 15): side steps recomputed in backward, a bf16 backbone
    "bypass_ckpt": {
        "tuners": [{"name": "bypass", "kind": "bypass", "at": "blocks.*", "checkpoint": True}],
        "trainable": ["head"],
    },
    "bypass_bf16": {
        "tuners": [{"name": "bypass", "kind": "bypass", "at": "blocks.*"}],
        "trainable": ["head"],
        "model": {"frozen_dtype": "bfloat16"},
    },
    "bypass_bf16_ckpt": {
        "tuners": [{"name": "bypass", "kind": "bypass", "at": "blocks.*", "checkpoint": True}],
        "trainable": ["head"],
        "model": {"frozen_dtype": "bfloat16"},
    },
}
# the same with train.release_freed_memory (glibc's mmap threshold fixed at 1 MiB, utune.train.memory): for a
# fair ratio the baseline gets it too
for _name in ("full", "bypass_bf16_ckpt", "bypass"):
    METHODS[f"{_name}_release"] = {**METHODS[_name], "release_freed_memory": True}

# the same LoRA as utune's "lora", built by Hugging Face PEFT on the same timm model (when installed)
PEFT_METHODS = ("lora_peft",)


def spec_for(method: str, model: str, img_size: int, num_classes: int = 100) -> dict[str, Any]:
    m = METHODS[method]
    return {
        "version": 1,
        "model": {
            "name": model,
            "pretrained": False,
            "num_classes": num_classes,
            "img_size": img_size,
            "kwargs": {"img_size": img_size},
            **m.get("model", {}),
        },
        "tuners": m["tuners"],
        "trainable": m["trainable"],
    }

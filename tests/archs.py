"""Tiny configurations of real architectures, shared by the graph and tuner tests (no downloads)."""

from __future__ import annotations

from typing import Any

# name -> (model name, kwargs, image size). Real timm/torchvision classes, shrunk for 2 CPU cores.
ARCHS: dict[str, tuple[str, dict[str, Any], int]] = {
    "vit": ("test_vit", {}, 160),
    "vit_avg": ("test_vit2", {}, 160),  # global average pooling: prompts must not be pooled
    "deit": ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32),
    "vit_reg": ("vit_small_patch16_224", {"img_size": 32, "depth": 2, "reg_tokens": 2, "no_embed_class": True}, 32),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "img_size": 32, "window_size": 4, "patch_size": 2},
        32,
    ),
    "convnext": ("test_convnext", {}, 64),
    "resnet": ("test_resnet", {}, 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "tv_shufflenet": ("torchvision:shufflenet_v2_x0_5", {}, 32),  # depthwise 3x3 convs in every unit
    "beit": ("beit_base_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}, 32),
    "levit": ("levit_128s", {}, 224),  # caches attention biases in eval mode only: the train graph serves both
    "tv_vit": (
        "torchvision:vit_b_16",
        {"image_size": 32},
        32,
    ),
    "tv_resnet": ("torchvision:resnet18", {}, 32),
}


# the classifier of each, kept trainable in the contract tests
HEADS = {
    "vit": "head",
    "vit_avg": "head",
    "deit": "head",
    "vit_reg": "head",
    "swin": "head",
    "convnext": "head",
    "resnet": "fc",
    "efficientnet": "classifier",
    "tv_shufflenet": "fc",
    "beit": "head",
    "tv_vit": "heads",
    "tv_resnet": "fc",
}


def model_section(arch: str, num_classes: int = 10) -> dict[str, Any]:
    name, kwargs, size = ARCHS[arch]
    section: dict[str, Any] = {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)}
    if name.startswith("torchvision:") or "img_size" not in kwargs:
        section["img_size"] = size
    return section

"""Classify images with a ``torch.export`` program from ``utune export --torch-export``, with only torch
and Pillow (no utune, no timm).

    python pt2_predict.py model.pt2 cat.jpg [more.png ...]

The metadata utune stored in the file (``extra_files["utune.json"]``) gives the input size, mean and std, the
eval crop and, where known, the class names.
"""

from __future__ import annotations

import json
import math
import sys

import torch
from PIL import Image

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def preprocess(path: str, meta: dict[str, str]) -> torch.Tensor:
    """The image as the model's eval transform gives it: (C, H, W) float32, normalised."""
    c, h, w = json.loads(meta["input_size"])
    crop_pct = float(meta.get("crop_pct", "1.0"))
    img = Image.open(path).convert("RGB" if c == 3 else "L")
    short = math.floor(min(h, w) / crop_pct)  # timm's eval transform: the short side to size / crop_pct ...
    if img.width <= img.height:
        size = (short, int(short * img.height / img.width))
    else:
        size = (int(short * img.width / img.height), short)
    img = img.resize(size, _RESAMPLE.get(meta.get("interpolation", "bicubic"), Image.BICUBIC))
    left, top = int(round((img.width - w) / 2.0)), int(round((img.height - h) / 2.0))  # ... then the centre
    img = img.crop((left, top, left + w, top + h))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, c).float() / 255.0
    mean, std = torch.tensor(json.loads(meta["mean"])), torch.tensor(json.loads(meta["std"]))
    return ((x - mean) / std).permute(2, 0, 1)


def main(model: str, images: list[str]) -> None:
    extra = {"utune.json": ""}
    program = torch.export.load(model, extra_files=extra)
    meta = json.loads(extra["utune.json"])
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    net = program.module()
    batch = torch.stack([preprocess(p, meta) for p in images])  # any batch size: the batch axis is dynamic
    with torch.no_grad():
        probs = net(batch).softmax(-1)
    for path, p in zip(images, probs, strict=True):
        top = int(p.argmax())
        label = names[top] if names else str(top)
        print(json.dumps({"image": path, "class": top, "label": label, "prob": round(float(p[top]), 4)}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL.pt2 IMAGE [IMAGE ...]")
    main(sys.argv[1], sys.argv[2:])

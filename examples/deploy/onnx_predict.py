"""Classify images with an ONNX model from ``utune export --onnx``, with only onnxruntime, numpy and Pillow.

    python onnx_predict.py model.onnx cat.jpg [more.png ...]

Everything the model needs is read from the file's metadata, which utune wrote: the input size, the mean and
std, the eval crop (timm's: resize the short side to size / crop_pct, centre crop) and, where known, the class
names. No utune and no torch are imported.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def preprocess(path: str, meta: dict[str, str]) -> np.ndarray:
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
    x = np.asarray(img, dtype=np.float32).reshape(h, w, c) / 255.0
    mean = np.array(json.loads(meta["mean"]), dtype=np.float32)
    std = np.array(json.loads(meta["std"]), dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def main(model: str, images: list[str]) -> None:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    batch = np.stack([preprocess(p, meta) for p in images])  # any batch size: the batch axis is dynamic
    logits = sess.run(None, {sess.get_inputs()[0].name: batch})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for path, p in zip(images, probs, strict=True):
        top = int(p.argmax())
        label = names[top] if names else str(top)
        print(json.dumps({"image": path, "class": top, "label": label, "prob": round(float(p[top]), 4)}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL.onnx IMAGE [IMAGE ...]")
    main(sys.argv[1], sys.argv[2:])

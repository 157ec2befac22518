"""Image transforms from the model's timm data config.

Every image goes through the same four steps:

1. convert the PIL image to RGB (3-channel models) or L (any other channel count), so grayscale
   datasets feed RGB models and vice versa;
2. timm's standard transform (:func:`timm.data.create_transform`): for evaluation its resize + centre
   crop at the model's ``crop_pct``; for training, by ``data.augment``: ``timm``, its random-resized crop,
   horizontal flip and colour jitter (no auto-augment, no random erasing); ``none``, the evaluation
   transform; ``crop`` / ``crop-flip``, the evaluation transform then a random crop of the input size
   from the image zero-padded by 1/8 of its size (CIFAR's 4 px of 32; 28 px: 4 px), plus a horizontal flip
   for ``crop-flip``: for small images, where a random-resized crop down to 8 % of the area leaves
   nothing of the object. Datasets with ``augment=False`` (VTAB) get a plain resize to the square input
   size instead of timm's transforms, the NOAH/SSF convention (``crop``/``crop-flip`` still apply);
3. scale to float in [0, 1] and repeat a single channel to the model's channel count;
4. normalise with the model's mean and std.

With ``device_normalize`` steps 3 and 4 move to the training device: the transform stops at the uint8
``(c, S, S)`` tensor of step 2 and :class:`InputNorm` scales, repeats and normalises whole batches there,
with the same float32 arithmetic (equal to the CPU path bit for bit on CPU). That saves a quarter of the
CPU time per image and sends 1 byte per value to the GPU instead of 4. Every augmentation utune builds
works on PIL images or uint8 tensors (timm leaves random erasing, the one that needs normalised floats,
out of an unnormalised transform); a pipeline with a step that needs float input (:data:`FLOAT_STEPS`)
keeps the CPU path, and its float batches pass the device step untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing as TimmRandomErasing
from torchvision.transforms import Compose, Normalize, RandomCrop, RandomErasing, RandomHorizontalFlip

from utune.errors import DataError

_PASSED_ON = ("interpolation", "crop_pct", "crop_mode")

# steps that read normalised float tensors: a pipeline holding one is normalised on the CPU
FLOAT_STEPS: tuple[type, ...] = (RandomErasing, TimmRandomErasing)


class ToMode:
    """Convert a PIL image to ``mode`` ("RGB" or "L")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class ToFloatChannels:
    """uint8 CHW tensor → float in [0, 1] with ``channels`` channels (a single channel is repeated)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
        if image.shape[0] == 1 and self.channels != 1:
            image = image.repeat(self.channels, 1, 1)
        return image

    def __repr__(self) -> str:
        return f"ToFloatChannels({self.channels})"


class InputNorm:
    """A batch of uint8 images ``(B, c, H, W)`` → normalised float ``(B, C, H, W)`` on its own device:
    ``(x / 255 - mean) / std``, a single channel repeated to ``C``. Float batches (already normalised on
    the CPU) pass unchanged, so the training loop can call it on whatever the loader yields."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != len(self.std) or any(v == 0 for v in self.std):
            raise DataError(f"bad normalisation: mean {self.mean}, std {self.std}", hint="one non-zero std per channel")
        self.channels = len(self.mean)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> InputNorm:
        """The model's mean and std (timm data config), one per input channel, as the CPU path uses them."""
        channels = input_shape(data_config, None)[0]
        return cls(
            _stats(data_config, "mean", IMAGENET_DEFAULT_MEAN, channels),
            _stats(data_config, "std", IMAGENET_DEFAULT_STD, channels),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        if x.ndim != 4:
            raise DataError(f"a uint8 image batch must be (batch, channels, height, width), got {tuple(x.shape)}")
        x = x.float().div_(255)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.repeat(1, self.channels, 1, 1)
        if x.device not in self._stats:
            shape = (1, self.channels, 1, 1)
            self._stats[x.device] = (
                torch.tensor(self.mean, device=x.device).view(shape),
                torch.tensor(self.std, device=x.device).view(shape),
            )
        mean, std = self._stats[x.device]
        return x.sub_(mean).div_(std)  # torchvision's Normalize, per image: the same float32 operations

    def __repr__(self) -> str:
        return f"InputNorm(mean={self.mean}, std={self.std})"


def input_shape(data_config: Mapping[str, Any], img_size: int | None) -> tuple[int, int, int]:
    """``(channels, height, width)`` from the model's ``input_size``, with ``img_size`` overriding H and W."""
    shape = tuple(data_config.get("input_size") or (3, 224, 224))
    if len(shape) != 3 or any(not isinstance(v, int) or v <= 0 for v in shape):
        raise DataError(f"model data config has input_size {shape!r}", hint="expected (channels, height, width)")
    channels, height, width = shape
    if img_size is not None:
        height = width = img_size
    return channels, height, width


def _stats(data_config: Mapping[str, Any], key: str, default: Sequence[float], channels: int) -> tuple:
    values = tuple(float(v) for v in (data_config.get(key) or default))
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise DataError(
        f"model data config has {len(values)} {key} values for {channels} input channels",
        hint=f"give data_config[{key!r}] one value per channel",
    )


def _small_image_steps(mode: str, height: int, width: int) -> list[Callable[[Any], Any]]:
    """``crop``/``crop-flip``: a random crop of the input size from the image zero-padded by 1/8 of it."""
    pad = max(1, round(min(height, width) / 8))
    steps: list[Callable[[Any], Any]] = [RandomCrop((height, width), padding=pad, fill=0)]
    if mode == "crop-flip":
        steps.append(RandomHorizontalFlip())
    return steps


def build_transform(
    data_config: Mapping[str, Any],
    img_size: int | None,
    *,
    training: bool,
    augment: bool = True,
    mode: str = "timm",
    device_normalize: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for one split: PIL image in, normalised ``(C, S, S)`` float tensor out; with
    ``device_normalize`` the uint8 ``(c, S, S)`` pixels instead, for :class:`InputNorm` on the device
    (unless a step needs float input: :data:`FLOAT_STEPS`).

    ``training`` with ``mode`` (``data.augment``: none | timm | crop | crop-flip) picks the training
    augmentation; ``augment=False`` is the dataset's plain-resize convention (VTAB)."""
    if mode not in ("none", "timm", "crop", "crop-flip"):
        raise DataError(f"unknown augmentation {mode!r}", hint="data.augment is one of: none, timm, crop, crop-flip")
    channels, height, width = input_shape(data_config, img_size)
    options = {key: data_config[key] for key in _PASSED_ON if data_config.get(key) is not None}
    if not augment:
        options.update(crop_pct=1.0, crop_mode="squash")
    timm_transform = create_transform(
        input_size=(channels, height, width),
        is_training=training and augment and mode == "timm",
        normalize=False,
        **options,
    )
    steps = timm_transform.transforms if isinstance(timm_transform, Compose) else [timm_transform]
    if training and mode in ("crop", "crop-flip"):
        steps = [*steps, *_small_image_steps(mode, height, width)]
    if device_normalize and not any(isinstance(step, FLOAT_STEPS) for step in steps):
        return Compose([ToMode("RGB" if channels == 3 else "L"), *steps])
    return Compose(
        [
            ToMode("RGB" if channels == 3 else "L"),
            *steps,
            ToFloatChannels(channels),
            Normalize(
                _stats(data_config, "mean", IMAGENET_DEFAULT_MEAN, channels),
                _stats(data_config, "std", IMAGENET_DEFAULT_STD, channels),
            ),
        ]
    )

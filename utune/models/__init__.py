"""The one place that knows timm and torchvision model names and how to load their weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utune._reference import reference_build
from utune.errors import ModelError
from utune.models.names import TORCHVISION_PREFIX, unknown_model


def _unknown(name: str) -> ModelError | None:
    found = unknown_model(name)
    return ModelError(*found) if found is not None else None


def _create_timm(name: str, num_classes: int | None, kwargs: dict[str, Any], download: bool) -> nn.Module:
    import timm

    if (err := _unknown(name)) is not None:
        raise err
    args = dict(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=download, **args)
    except (TypeError, ValueError, RuntimeError) as e:  # bad kwargs, unknown tag, hub unreachable
        raise ModelError(f"timm could not create {name!r}: {e}", hint="check model.kwargs and the name") from e
    except OSError as e:
        raise ModelError(
            f"could not download weights for {name!r}: {e}",
            hint="use model.pretrained=false, or a local .safetensors/.pth file as model.pretrained",
        ) from e


def _create_torchvision(name: str, num_classes: int | None, kwargs: dict[str, Any], download: bool) -> nn.Module:
    import torchvision

    short = name[len(TORCHVISION_PREFIX) :]
    if (err := _unknown(name)) is not None:
        raise err
    args = dict(kwargs)
    try:
        if download:
            weights = torchvision.models.get_model_weights(short).DEFAULT
            model = torchvision.models.get_model(short, weights=weights, **args)
            if num_classes is not None:
                _reset_torchvision_head(model, num_classes)
            return model
        if num_classes is not None:
            args["num_classes"] = num_classes
        return torchvision.models.get_model(short, weights=None, **args)
    except (TypeError, ValueError) as e:
        raise ModelError(f"torchvision could not create {short!r}: {e}", hint="check model.kwargs") from e
    except OSError as e:
        raise ModelError(
            f"could not download weights for {name!r}: {e}",
            hint="use model.pretrained=false, or a local .safetensors/.pth file as model.pretrained",
        ) from e


def _reset_torchvision_head(model: nn.Module, num_classes: int) -> None:
    """Replace the last Linear of a torchvision classifier (fc, classifier[-1], heads.head)."""
    last_name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_name, last = n, m
    if last is None or last_name is None:
        raise ModelError(f"cannot find the classifier of this torchvision model to set {num_classes} classes")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


def classifier_names(model: nn.Module) -> list[str]:
    """Module paths of the classification head, used to drop mismatched head weights on load."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = cfg.get("classifier")
    if clf:
        return [clf] if isinstance(clf, str) else list(clf)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return last[-1:]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth state dict; a wrong or corrupt file is a ModelError."""
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist", hint="check model.pretrained")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".pth", ".pt", ".bin"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
                if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                    obj = obj[key]
            if not isinstance(obj, dict):
                raise ModelError(f"{path} does not hold a state dict (found {type(obj).__name__})")
            return obj
    except ModelError:
        raise
    except Exception as e:  # safetensors/pickle raise many types on corrupt input
        raise ModelError(
            f"cannot read weights file {str(path)!r}: {type(e).__name__}: {e}",
            hint="the file may be truncated or not a state dict; re-download or re-export it",
        ) from e
    raise ModelError(f"weights file {str(path)!r} must end in .safetensors or .pth")


def load_weights(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a local state dict (``state``: the file's, read already); head tensors whose shape differs (other
    num_classes) are skipped."""
    state = dict(state) if state is not None else read_state_dict(path)
    own = model.state_dict()
    heads = tuple(classifier_names(model))
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith(heads)]
    for k in skipped:
        del state[k]
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise ModelError(
            f"weights file {str(path)!r} does not fit this model: {k} has shape "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model",
            hint="check model.name and model.kwargs match the checkpoint",
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        what = f"missing keys {missing[:3]}" if missing else f"unexpected keys {unexpected[:3]}"
        raise ModelError(
            f"weights file {str(path)!r} does not match {type(model).__name__}: {what}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected)",
            hint="check model.name and model.kwargs match the checkpoint",
        )


def create_model(
    name: str,
    *,
    pretrained: bool | str | Path = False,
    num_classes: int | None = None,
    kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Create a timm (``name``) or torchvision (``torchvision:name``) model, with weights if asked.

    ``img_size`` builds models that take an image size at that size (timm's ``img_size``: ViT, DeiT, Swin,
    BEiT...; torchvision's ``image_size``: ViT); models that run at any size (CNNs) ignore it.
    """
    download = pretrained is True
    args = dict(kwargs or {})
    tv = name.startswith(TORCHVISION_PREFIX)
    factory = _create_torchvision if tv else _create_timm
    key = "image_size" if tv else "img_size"
    if img_size is not None and args.get(key, img_size) != img_size:
        raise ModelError(
            f"model.img_size is {img_size} but model.kwargs.{key} is {args[key]}",
            hint=f"set one of them (model.img_size builds the model at that size; drop kwargs.{key})",
        )

    def make() -> nn.Module:
        if img_size is not None and key not in args:
            try:
                return factory(name, num_classes, {**args, key: img_size}, download)
            except ModelError as e:
                if f"'{key}'" not in str(e) or "argument" not in str(e):  # "unexpected keyword argument(s): 'img_size'"
                    raise
        return factory(name, num_classes, args, download)  # runs at any size: nothing to set

    if not isinstance(pretrained, str | Path) or isinstance(pretrained, bool):
        return make()
    path = Path(pretrained).expanduser()
    try:
        state = read_state_dict(path)
    except ModelError:
        make()  # a wrong name or kwargs is the first thing to fix (and was reported first before)
        raise
    model = None if reference_build() else _from_file_on_meta(make, state)
    if model is None:
        model = make()
        load_weights(model, path, state)
    return model


def _from_file_on_meta(make: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module | None:
    """The model created on meta (the RNG drawing what timm's init would) with ``state`` copied in: the same
    model and RNG state as a real init then a load, without the init's arithmetic. None, the RNG as it was,
    when ``state`` does not cover every tensor (a head for other classes keeps its random init) or a tensor
    cannot be made real: the caller creates the model for real."""
    from utune.models.meta_init import covers, create_on_meta, materialize, probe

    rng = torch.get_rng_state()
    try:
        if not covers(probe(make), state):  # a head for other classes: the real init is needed anyway
            return None
        model = create_on_meta(make)
        if materialize(model, state):
            return model
    except Exception:  # an init that reads values (a rejection sampler), a seeded op not replayable, ...
        pass
    torch.set_rng_state(rng)
    return None


def input_size(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) the model expects: explicit size, then the model's own patch-embed size, then its cfg."""
    chans = 3
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        chans = int(cfg["input_size"][0])
    if img_size is not None:
        return (chans, img_size, img_size)
    pe = getattr(model, "patch_embed", None)
    pe_size = getattr(pe, "img_size", None)
    if pe_size is not None:
        h, w = (pe_size, pe_size) if isinstance(pe_size, int) else tuple(pe_size)
        return (chans, int(h), int(w))
    tv_size = getattr(model, "image_size", None)  # torchvision VisionTransformer
    if isinstance(tv_size, int):
        return (chans, tv_size, tv_size)
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return (int(c), int(h), int(w))
    return (chans, 224, 224)


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's data config (mean, std, interpolation, crop_pct) at the model's input size."""
    from timm.data import resolve_model_data_config

    try:
        cfg = dict(resolve_model_data_config(model))
    except Exception:  # torchvision models carry no timm cfg
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        cfg = {
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
    cfg["input_size"] = input_size(model, img_size)
    return cfg

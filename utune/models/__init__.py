"""The one place that knows model names and how to load their weights: timm and torchvision registry names,
a user's factory (``model.name: my_pkg.nets:make_net``, imported through :mod:`utune._imports`) and the names
installed packages publish in the ``utune.models`` entry-point group. Weights files are read the way timm
reads them (:func:`timm.models.load_state_dict`: EMA/``state_dict``/``model`` wrappers, ``module.`` prefixes)
and fitted with the model family's own ``checkpoint_filter_fn`` (position embeddings resampled to another
image size)."""

from __future__ import annotations

import importlib
import inspect as _inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utune._imports import CodeImportError, entry_points, is_ref, load_ref
from utune._reference import reference_build
from utune.errors import ModelError
from utune.models.names import MODELS_GROUP, TORCHVISION_PREFIX, unknown_model


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


# ---- a user's factory ------------------------------------------------------------------------------------


def factory_of(name: str) -> Callable[..., Any] | None:
    """The user's factory ``name`` names (``package.module:attr``, or a name a package publishes in the
    ``utune.models`` entry-point group), imported; None for a registry (timm/torchvision) name.

    A ``module:attr`` reference is imported only when the user named it (:mod:`utune._imports`)."""
    if is_factory_ref(name):
        return load_ref(name, what="model.name")
    if unknown_model(name) is None:
        return None
    ep = entry_points(MODELS_GROUP).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except Exception as e:  # the package's module raised while importing
        raise CodeImportError(
            f"model.name {name!r}: the entry point {ep.value!r} (group {MODELS_GROUP}) cannot be loaded: "
            f"{type(e).__name__}: {e}",
            hint="reinstall or fix the package that publishes it (UTUNE_DEBUG=1 shows the traceback)",
        ) from e


def is_factory_ref(name: str) -> bool:
    """Whether ``name`` is a ``package.module:function`` reference (``torchvision:resnet18`` is a registry name)."""
    return is_ref(name) and not name.startswith(TORCHVISION_PREFIX)


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a user's factory rather than a registry model (nothing is imported)."""
    return is_factory_ref(name) or (unknown_model(name) is not None and name in entry_points(MODELS_GROUP))


def _parameters(fn: Callable[..., Any]) -> set[str]:
    """The keyword names ``fn`` takes explicitly (``**kwargs`` does not count: it may not pass them on)."""
    try:
        sig = _inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing is known
        return set()
    kinds = (_inspect.Parameter.POSITIONAL_OR_KEYWORD, _inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in sig.parameters.items() if p.kind in kinds}


def _create_from_factory(
    name: str, num_classes: int | None, kwargs: dict[str, Any], download: bool, img_size: int | None
) -> nn.Module:
    """Call the user's factory with ``model.kwargs``, plus ``num_classes``, ``img_size`` and ``pretrained``
    where its signature takes them."""
    fn = factory_of(name)
    assert fn is not None  # callers check is_factory_name first
    takes = _parameters(fn)
    args = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("img_size", img_size)):
        if value is not None and key in takes and key not in args:
            args[key] = value
    if download:
        if "pretrained" not in takes:
            raise ModelError(
                f"model.pretrained is true but the factory {name!r} takes no `pretrained` argument",
                hint="give its weights as a file (model.pretrained: weights.safetensors), or load them in the factory",
            )
        args["pretrained"] = True
    try:
        model = fn(**args)
    except TypeError as e:
        try:
            sig = str(_inspect.signature(fn))
        except (TypeError, ValueError):
            sig = "(...)"
        raise ModelError(
            f"the model factory {name!r} could not be called with {sorted(args)}: {e}",
            hint=f"check model.kwargs against its signature {sig}",
        ) from e
    except Exception as e:  # the user's code failed: say what, the traceback is theirs (UTUNE_DEBUG=1)
        raise ModelError(
            f"the model factory {name!r} raised {type(e).__name__}: {e}",
            hint="fix the factory or model.kwargs (UTUNE_DEBUG=1 shows the traceback)",
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"the model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module",
            hint="a factory returns the model (an nn.Module)",
        )
    return model


# ---- weights files ---------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth state dict as timm reads one (its EMA weights when the checkpoint holds
    them, else its ``state_dict``/``model``/``module`` entry; DDP ``module.`` and ``torch.compile`` prefixes
    stripped); a wrong or corrupt file is a ModelError."""
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist", hint="check model.pretrained")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ModelError(f"weights file {str(path)!r} must end in .safetensors or .pth")
    from timm.models import clean_state_dict, load_state_dict

    try:
        obj: Any = load_state_dict(str(path), use_ema=True)
        if isinstance(obj, dict) and isinstance(obj.get("module"), dict) and len(obj) == 1:
            obj = clean_state_dict(obj["module"])  # a wrapper timm does not unwrap
    except Exception as e:  # safetensors/pickle raise many types on corrupt input
        raise ModelError(
            f"cannot read weights file {str(path)!r}: {type(e).__name__}: {e}",
            hint="the file may be truncated or not a state dict; re-download or re-export it",
        ) from e
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        found = type(obj).__name__ if not isinstance(obj, dict) else f"a dict of {sorted(obj)[:4]}"
        raise ModelError(f"{path} does not hold a state dict (found {found})")
    return tensors


def _family_filter(model: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    """timm's ``checkpoint_filter_fn`` of the model's family (converts foreign layouts, resamples position
    embeddings to the model's size); None for models outside timm."""
    module = type(model).__module__
    if not module.startswith("timm.models."):
        return None
    fn = getattr(importlib.import_module(module), "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _fit(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """(state without the head keys of another shape, those keys, the missing keys, the unexpected keys and
    shape mismatches as text). A BatchNorm's ``num_batches_tracked`` may be missing (older files)."""
    own = model.state_dict()
    heads = tuple(classifier_names(model))
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and heads and k.startswith(heads)]
    state = {k: v for k, v in state.items() if k not in dropped}
    bad = [
        f"{k} has shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and k not in dropped and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    return state, dropped, missing, unexpected + bad


def load_weights(
    model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None, notes: list[str] | None = None
) -> None:
    """Load a local state dict (``state``: the file's, read already) the way timm would.

    A file in another layout or at another image size goes through the family's ``checkpoint_filter_fn``
    (position embeddings resampled); a head for another class count is skipped (re-initialised) and a
    backbone-only file leaves the head at its init, each with a note in ``notes``. Anything else that does
    not fit is a ModelError naming the keys and the likely cause."""
    state = dict(state) if state is not None else read_state_dict(path)
    fitted, dropped, missing, wrong = _fit(model, state)
    filt = _family_filter(model)
    converted: list[str] = []
    if (missing or wrong) and filt is not None:
        try:
            filtered = filt(state, model)
        except Exception:  # the filter does not apply to this file: report the file as it is
            filtered = None
        if filtered is not None:
            fitted, dropped, missing, wrong = _fit(model, filtered)
            converted = [
                f"{k} {tuple(state[k].shape)} -> {tuple(v.shape)}"
                for k, v in filtered.items()
                if k in state and state[k].shape != v.shape and k not in dropped
            ]
    heads = tuple(classifier_names(model))
    head_missing = [k for k in missing if heads and k.startswith(heads)]
    head_unexpected = [k for k in wrong if heads and k.startswith(heads) and " has shape " not in k]
    missing = [k for k in missing if k not in head_missing]
    wrong = [k for k in wrong if k not in head_unexpected]
    if missing or wrong:
        raise ModelError(_misfit(model, path, missing, wrong), hint=_misfit_hint(model, missing, wrong))
    for k in head_unexpected:
        del fitted[k]
    model.load_state_dict(fitted, strict=False)
    if notes is None:
        return
    if converted:
        done = "; ".join(converted)
        notes.append(f"{path.name}: resampled to the model's size by timm's checkpoint_filter_fn: {done}")
    if dropped:
        notes.append(f"{path.name}: the head ({', '.join(dropped)}) is for another class count: re-initialised")
    if head_missing:
        notes.append(f"{path.name} holds no head ({', '.join(head_missing)}): the head keeps its initialisation")
    if head_unexpected:
        notes.append(f"{path.name}: head tensors the model has no place for were left out: {head_unexpected}")


def _misfit(model: nn.Module, path: Path, missing: list[str], wrong: list[str]) -> str:
    unexpected = [w for w in wrong if " has shape " not in w]
    shapes = [w for w in wrong if " has shape " in w]
    parts = [f"missing {len(missing)} keys ({', '.join(missing[:3])})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})"] if unexpected else []
    parts += [f"{len(shapes)} of another shape ({'; '.join(shapes[:2])})"] if shapes else []
    return f"weights file {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts)


def _misfit_hint(model: nn.Module, missing: list[str], wrong: list[str]) -> str:
    """The likely cause: a prefix around every key, another size of the same family, another architecture."""
    unexpected = [w for w in wrong if " has shape " not in w]
    own = list(model.state_dict())
    if missing and unexpected:
        for key in unexpected:
            stem = next((k for k in own if key.endswith("." + k)), None)
            if stem is not None:
                prefix = key[: -len(stem)]
                return f"the file's keys carry the prefix {prefix!r} (e.g. {key}): save the inner module's state_dict"
    if wrong and not unexpected and not missing:
        return "the file is for another size of this architecture: check model.kwargs (depth, width) and model.name"
    return "the file is for another architecture: check model.name and model.kwargs match the checkpoint"


def create_model(
    name: str,
    *,
    pretrained: bool | str | Path = False,
    num_classes: int | None = None,
    kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
    notes: list[str] | None = None,
) -> nn.Module:
    """Create a timm (``name``), torchvision (``torchvision:name``) or user-factory (``package.module:attr``,
    or a ``utune.models`` entry point) model, with weights if asked.

    ``img_size`` builds models that take an image size at that size (timm's ``img_size``: ViT, DeiT, Swin,
    BEiT...; torchvision's ``image_size``: ViT; a factory with an ``img_size`` parameter); models that run
    at any size (CNNs) ignore it. ``notes``: where what loading a weights file adjusted is said (a head
    re-initialised, position embeddings resampled).
    """
    download = pretrained is True
    args = dict(kwargs or {})
    tv = name.startswith(TORCHVISION_PREFIX)
    key = "image_size" if tv else "img_size"
    if img_size is not None and args.get(key, img_size) != img_size:
        raise ModelError(
            f"model.img_size is {img_size} but model.kwargs.{key} is {args[key]}",
            hint=f"set one of them (model.img_size builds the model at that size; drop kwargs.{key})",
        )

    if is_factory_name(name):

        def make() -> nn.Module:
            return _create_from_factory(name, num_classes, args, download, img_size)

    else:
        factory = _create_torchvision if tv else _create_timm

        def make() -> nn.Module:
            if img_size is not None and key not in args:
                try:
                    return factory(name, num_classes, {**args, key: img_size}, download)
                except ModelError as e:
                    if f"'{key}'" not in str(e) or "argument" not in str(e):  # "unexpected keyword argument(s)"
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
        load_weights(model, path, state, notes)
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


def input_size(
    model: nn.Module, img_size: int | None = None, size: tuple[int, int, int] | None = None
) -> tuple[int, int, int]:
    """(C, H, W) the model expects: ``size`` (``model.input_size``), ``img_size``, then the model's own
    patch-embed size, then its timm cfg; a torchvision CNN takes 224 px. A model that says nothing about its
    input (a user's own module) needs one of the first two: a ModelError asks for it."""
    if size is not None:
        return (int(size[0]), int(size[1]), int(size[2]))
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
    tv_size = getattr(model, "image_size", None)  # torchvision's VisionTransformer (int), open_clip's (h, w)
    if isinstance(tv_size, int):
        return (chans, tv_size, tv_size)
    if isinstance(tv_size, tuple | list) and len(tv_size) == 2 and all(isinstance(v, int) for v in tv_size):
        return (chans, int(tv_size[0]), int(tv_size[1]))
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return (int(c), int(h), int(w))
    if type(model).__module__.startswith(("torchvision.", "timm.")):
        return (chans, 224, 224)
    raise ModelError(
        f"the input size of {type(model).__name__} is unknown (it carries no timm or torchvision config)",
        hint="set model.img_size: 224 (3x224x224) or model.input_size: [C, H, W] in the spec "
        "(Python: utune.build(spec, model=net, input_size=(3, 224, 224)))",
    )


def data_config(
    model: nn.Module, img_size: int | None = None, size: tuple[int, int, int] | None = None
) -> dict[str, Any]:
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
    cfg["input_size"] = input_size(model, img_size, size)
    return cfg

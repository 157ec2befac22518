"""utune: config-driven model surgery for parameter-efficient transfer learning.

The Python API the CLI is built on::

    import utune
    spec = utune.load_spec("spec.yaml", overrides=["tuners.0.dim=16"])
    built = utune.build(spec)        # .model (the rewritten GraphModule, with the base model's API), .report
    built = utune.build(spec, model=net)     # any nn.Module of yours (the spec's model.name left out)
    tuned = utune.tune(net, spec)            # the same, returning the tuned model (PEFT's get_peft_model)
    feats = built.model.forward_features(x)  # timm models: the tuned features (utune.engine.tuned.TunedModel)
    rows = utune.inspect("vit_base_patch16_224")
    sets = utune.build_sets({"cifar": "a.yaml", "pets": "pets.safetensors"})  # one backbone, named tuners
    result = utune.predict("runs/spec-20261207-120000", ["photos/"])  # top-5 labels per image
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from utune._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from utune.engine.record import Built
    from utune.engine.sets import TunerSets
    from utune.engine.tuned import TunedModel
    from utune.spec import Spec

__all__ = ["__version__", "build", "build_sets", "inspect", "load_spec", "predict", "tune"]


def load_spec(source: Any, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    from utune.spec import load_spec as _load

    return _load(source, overrides)


def build(spec_or_path: Any, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> Built:
    from utune.engine.build import build as _build

    return _build(spec_or_path, overrides, **kwargs)


def tune(model: nn.Module, spec: Any, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> TunedModel:
    """Attach the spec's tuners to ``model`` (any ``nn.Module``) and freeze the rest: ``build(spec,
    model=model).model``; ``merge_and_unload()`` on it returns ``model``'s own class with the tuners folded in."""
    from utune.engine.build import build as _build

    return cast("TunedModel", _build(spec, overrides, model=model, **kwargs).model)


def inspect(model_or_name: Any, spec: Any = None) -> list[dict[str, Any]]:
    from utune.engine.build import inspect as _inspect

    return _inspect(model_or_name, spec)


def build_sets(sources: Any, model: nn.Module | None = None) -> TunerSets:
    from utune.engine.sets import build_sets as _build_sets

    return _build_sets(sources, model=model)


def predict(source: Any, images: Any, **kwargs: Any) -> dict[str, Any]:
    """Label image files with a run, a tuner file (``spec=``) or an export folder: see :mod:`utune.runs.predict`."""
    from utune.runs.predict import predict as _predict

    return _predict(source, images, **kwargs)

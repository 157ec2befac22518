"""utune: config-driven model surgery for parameter-efficient transfer learning.

The Python API the CLI is built on::

    import utune
    spec = utune.load_spec("spec.yaml", overrides=["tuners.0.dim=16"])
    built = utune.build(spec)        # .model (the rewritten GraphModule, with the base model's API), .report
    built = utune.build(spec, model=net)     # any nn.Module of yours (the spec's model.name left out)
    tuned = utune.tune(net, spec)            # the same, returning the tuned model (PEFT's get_peft_model)
    feats = built.model.forward_features(x)  # timm models: the tuned features (utune.tuned.TunedModel)
    rows = utune.inspect("vit_base_patch16_224")
    sets = utune.build_sets({"cifar": "a.yaml", "pets": "pets.safetensors"})  # one backbone, named tuners
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

if TYPE_CHECKING:
    from torch import nn

    from utune.api import Built
    from utune.sets import TunerSets
    from utune.spec import Spec
    from utune.tuned import TunedModel

__all__ = ["__version__", "build", "build_sets", "inspect", "load_spec", "tune"]


def load_spec(source: Any, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    from utune.spec import load_spec as _load

    return _load(source, overrides)


def build(spec_or_path: Any, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> Built:
    from utune.api import build as _build

    return _build(spec_or_path, overrides, **kwargs)


def tune(model: nn.Module, spec: Any, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> TunedModel:
    """Attach the spec's tuners to ``model`` (any ``nn.Module``) and freeze the rest: ``build(spec,
    model=model).model``; ``merge_and_unload()`` on it returns ``model``'s own class with the tuners folded in."""
    from utune.api import build as _build

    return _build(spec, overrides, model=model, **kwargs).model


def inspect(model_or_name: Any, spec: Any = None) -> list[dict[str, Any]]:
    from utune.api import inspect as _inspect

    return _inspect(model_or_name, spec)


def build_sets(sources: Any, model: nn.Module | None = None) -> TunerSets:
    from utune.sets import build_sets as _build_sets

    return _build_sets(sources, model=model)

"""The spec: one YAML file saying which model, which tuners where, what trains, and how to export.

- :mod:`utune.spec.load`: the spec's schema and its loading (every problem at once, with its line),
  overrides, hashing and serialisation;
- :mod:`utune.spec.sections`: the ``data:`` and ``train:`` sections;
- :mod:`utune.spec.yamlpos`: YAML with line numbers, duplicate keys and ``key.path=value`` overrides.
"""

from __future__ import annotations

from typing import Any

from utune.spec.load import (
    PATH_KEYS,
    SPEC_VERSION,
    ExportConfig,
    ModelConfig,
    Spec,
    TunerRule,
    load_spec,
    load_spec_text,
    spec_hash,
    spec_json_schema,
    spec_to_dict,
    spec_to_yaml,
    validate_files,
)
from utune.spec.sections import DataConfig, TrainConfig

__all__ = [
    "PATH_KEYS",
    "SPEC_VERSION",
    "DataConfig",
    "ExportConfig",
    "ModelConfig",
    "Spec",
    "TrainConfig",
    "TunerRule",
    "load_spec",
    "load_spec_text",
    "spec_hash",
    "spec_json_schema",
    "spec_to_dict",
    "spec_to_yaml",
    "validate_files",
]


def __getattr__(name: str) -> Any:
    """Anything else :mod:`utune.spec.load` defines (its helpers), read through the package."""
    from utune.spec import load

    try:
        return getattr(load, name)
    except AttributeError:
        raise AttributeError(f"module 'utune.spec' has no attribute {name!r}") from None

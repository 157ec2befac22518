"""The spec: one YAML file saying which model, which tuners where, what trains, and how to export.

- :mod:`utune.spec.schema`: the sections as pydantic models and the field types they share;
- :mod:`utune.spec.load`: loading (every problem at once, with its line), overrides, hashing, serialisation;
- :mod:`utune.spec.sections`: the ``data:`` and ``train:`` sections;
- :mod:`utune.spec.yamlpos`: YAML with line numbers, duplicate keys and ``key.path=value`` overrides.
"""

from __future__ import annotations

from typing import Any

from utune.spec.load import (
    PATH_KEYS,
    load_spec,
    load_spec_text,
    spec_hash,
    spec_json_schema,
    spec_to_dict,
    spec_to_yaml,
    validate_files,
)
from utune.spec.schema import SPEC_VERSION, ExportConfig, ModelConfig, Spec, TunerRule
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
    """Anything else :mod:`utune.spec.load` or :mod:`utune.spec.schema` defines, read through the package."""
    from utune.spec import load, schema

    for module in (load, schema):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'utune.spec' has no attribute {name!r}")

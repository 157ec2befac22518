"""Shared pydantic base for every section of the spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A spec section: unknown keys are errors, values are validated strictly enough to catch typos.

    No number may be ``inf`` or ``nan`` (``train.lr: .inf`` would train to NaN and exit 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

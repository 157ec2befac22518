"""Shared pydantic base for every section of the spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A spec section: unknown keys are errors, values are validated strictly enough to catch typos."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

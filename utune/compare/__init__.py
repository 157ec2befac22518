"""Methods compared on the user's own data: choice of hyper-parameters on a validation split carved from the
training data, several seeds, 95 % confidence intervals (``utune compare``)."""

from __future__ import annotations

from .core import DEFAULT_VAL_SIZE, CompareReporter, Method, compare
from .grid import parse_grid

__all__ = ["DEFAULT_VAL_SIZE", "CompareReporter", "Method", "compare", "parse_grid"]

"""The build as it was before the fast paths, kept reachable for the equivalence test and the benchmark.

Inside :func:`reference` a build creates a model whose weights come from a file for real (timm's init,
then the copy), traces it in train and in eval mode, and propagates shapes with real forwards. Nothing else
turns it on: it is not a user option.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_REFERENCE: ContextVar[bool] = ContextVar("utune_reference_build", default=False)


def reference_build() -> bool:
    """True inside :func:`reference`."""
    return _REFERENCE.get()


@contextmanager
def reference() -> Iterator[None]:
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)

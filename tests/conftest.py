"""Test-wide settings."""

from __future__ import annotations

import os

import torch

# One intra-op thread: the tests are many small ops, where a second thread mostly spin-waits (several
# times slower on a loaded 2-core machine); subprocess tests (torchrun) then do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("UTUNE_QUIET", "1")


# ---- tiers: `make test-fast` runs `-m "not slow"` (no subprocess, no process group; minutes), `make test` all ----
import pytest  # noqa: E402

# files that start no subprocess yet build every reference spec or sweep timm's families: minutes each
_HEAVY = {"test_specs_reference.py", "test_sweep_families.py"}
_SPAWNS = ("subprocess", "torchrun", "multiprocessing", "mp.spawn")


def _spawns(path: object, cache: dict[object, bool] = {}) -> bool:  # noqa: B006  (a per-session memo)
    if path not in cache:
        text = open(str(path), encoding="utf-8").read()
        cache[path] = any(word in text for word in _SPAWNS)
    return cache[path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test is slow when marked so, when its file starts other processes (the `utune` command, torchrun,
    process pools), or when its file is one of the heavy ones."""
    for item in items:
        if item.path.name in _HEAVY or _spawns(item.path):
            item.add_marker(pytest.mark.slow)

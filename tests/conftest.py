"""Test-wide settings."""

from __future__ import annotations

import os

import torch

# One intra-op thread: the tests are many small ops, where a second thread mostly spin-waits (several
# times slower on a loaded 2-core machine); subprocess tests (torchrun) then do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("UTUNE_QUIET", "1")

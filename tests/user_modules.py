"""Plain ``nn.Module`` classes the tests name in ``kind: module`` rules (``class: tests.user_modules:...``), as a
user names their own: nothing here knows utune."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """``W_up GELU(W_down x)`` on channels-last input, ``W_up = 0``: the model starts as the base one."""

    def __init__(self, channels: int, hidden: int = 4) -> None:
        super().__init__()
        self.down = nn.Linear(channels, hidden)
        self.up = nn.Linear(hidden, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(x)))


class Mixer(nn.Module):
    """A channel map from ``c_in`` to ``c_out`` (a site whose input and output differ in channels), random at
    init: not the identity."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

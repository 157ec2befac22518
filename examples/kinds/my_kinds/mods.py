"""A plain ``nn.Module`` for ``kind: module``: utune builds it with the site's channel count and adds its output."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """``U(x) = W_up GELU(W_down x)`` on channels-last input; ``W_up = 0`` so the model starts as the base."""

    def __init__(self, channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.down = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, channels)
        nn.init.zeros_(self.up.weight)  # identity at init: your choice; `apply --verify` reports it
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))

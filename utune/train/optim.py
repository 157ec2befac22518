"""Optimizer over the trainable parameters only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from utune.errors import UserInputError
from utune.spec.sections import TrainConfig


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _no_decay_names(model: nn.Module) -> set[str]:
    # timm models name their position embeddings / tokens here; a GraphModule from utune's engine
    # does not have the method, and the ndim rule below still covers biases, norms and scales.
    fn = getattr(model, "no_weight_decay", None)
    if not callable(fn):
        return set()
    try:
        return set(fn())
    except Exception:  # a model's own helper failing must not stop training; fall back to the ndim rule
        return set()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices/kernels, and undecayed biases, norm weights and other <=1-D vectors.

    Each group carries ``param_names`` (torch's own key) so a checkpoint can check that the optimizer
    state it restores belongs to the same parameters, in the same order.
    """
    skip = _no_decay_names(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in trainable_named_parameters(model):
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or leaf in skip:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {"params": [p for _, p in members], "param_names": [n for n, _ in members], "weight_decay": wd}
            )
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise UserInputError(
            "the model has no trainable parameters",
            hint="check the spec's tuners / trainable patterns; nothing would be learned",
        )
    # Fused kernels exist for CUDA (one launch instead of one per tensor); foreach elsewhere.
    fused = device.type == "cuda"
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
        )
    raise UserInputError(f"unknown optimizer {cfg.optimizer!r}", hint="use adamw or sgd")


def lr_factor(step: int, *, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Multiplier of ``base_lr`` for optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    floor = min(min_lr / base_lr, 1.0)
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, total_steps: int, steps_per_epoch: int
) -> LambdaLR:
    """Per-step schedule; warm-up is ``warmup_epochs`` epochs' worth of steps, capped at the run length."""
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, total=total_steps, warmup=warmup, base_lr=cfg.lr, min_lr=cfg.min_lr)

    return LambdaLR(optimizer, factor)

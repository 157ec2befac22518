"""The training state beside the weights: one dataclass that is the schema of a checkpoint's ``state.pt``.

What is saved is exactly what :meth:`TrainState.to_dict` writes, and a resume reads it back with
:meth:`TrainState.from_dict`: one place, so a new counter cannot be saved and forgotten on resume.
Everything is plain data (tensors, numbers, strings, lists, dicts) so ``torch.load(weights_only=True)``
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from utune.errors import CheckpointError

STATE_VERSION = 1


@dataclass
class TrainState:
    """Counters, metrics and the optimizer/scheduler/RNG states a resume needs, at a step boundary."""

    steps_per_epoch: int
    batch_size: int  # per process and micro-batch
    grad_accum: int
    world: int
    seed: int
    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)  # every metrics.jsonl record so far
    best: dict[str, Any] | None = None  # {"split", "acc", "step"} of the best evaluation
    elapsed: float = 0.0  # wall seconds of the run, over all its sessions
    train_time: float = 0.0  # seconds spent in training steps (evaluation and checkpoints excluded)
    images: int = 0  # training images seen (all ranks)
    last_loss: float | None = None
    frozen: list[float] = field(default_factory=list)  # fingerprint of the frozen weights trained against
    meta: dict[str, Any] | None = None  # run metadata (model, dataset, processes)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: RNG streams, partial log window
    version: int = STATE_VERSION

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def sampler_position(self) -> tuple[int, int]:
        """(epoch, samples of that epoch this rank consumed) at ``step``: where the data order resumes."""
        return self.epoch, (self.step % self.steps_per_epoch) * self.grad_accum * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: no copies of optimizer tensors
        epoch, skip = self.sampler_position()
        out.update(epoch=epoch, sampler={"epoch": epoch, "skip": skip})  # for readers of state.pt
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> TrainState:
        if data.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"{source} has format version {data.get('version')}, not {STATE_VERSION}",
                hint="resume with the utune version that wrote it, or start the run again",
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in ("steps_per_epoch", "batch_size", "grad_accum", "world", "seed") if n not in data)
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}", hint="it is not a utune training state")
        return cls(**{k: v for k, v in data.items() if k in names})

    def check_plan(self, other: TrainState, folder: Path) -> None:
        """A resume must run the same steps: same world, batch size, accumulation and epoch length."""
        for key in ("world", "batch_size", "grad_accum", "steps_per_epoch"):
            if getattr(self, key) != getattr(other, key):
                raise CheckpointError(
                    f"cannot resume {folder}: it was trained with {key}={getattr(self, key)}, this run has "
                    f"{getattr(other, key)}",
                    hint="resume with the same batch size, grad_accum, process count and dataset",
                )

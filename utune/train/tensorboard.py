"""TensorBoard event files for a run (``train.log: [tensorboard]``), written through torch's SummaryWriter.

Scalars per log step (``train/loss``, ``train/lr``, ``train/accuracy``, ``train/images_per_s``) and per
evaluation (``<split>/accuracy``, ``<split>/loss``), against the optimizer step; the resolved spec as text.
Only the writing rank (rank 0) writes. ``metrics.jsonl`` stays the run's record; this is a view of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utune.errors import UserInputError


class TensorBoardReporter:
    """A :class:`utune.train.loop.Reporter` that writes TensorBoard events into ``folder``."""

    def __init__(self, folder: Path, spec_text: str | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserInputError(
                "train.log: [tensorboard] needs the tensorboard package",
                hint="pip install 'utune[tensorboard]', or drop tensorboard from train.log",
            ) from None
        self.writer = SummaryWriter(log_dir=str(folder))
        if spec_text:
            self.writer.add_text("spec", "```yaml\n" + spec_text + "\n```", global_step=0)

    def start(self, total: int, step: int) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if "split" in record:
            self.writer.add_scalar(f"{record['split']}/accuracy", record["acc"], step)
            self.writer.add_scalar(f"{record['split']}/loss", record["loss"], step)
            return
        for key, tag in (("loss", "loss"), ("lr", "lr"), ("train_acc", "accuracy"), ("images_per_s", "images_per_s")):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{tag}", record[key], step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Reporters:
    """Several reporters as one (the CLI's progress and TensorBoard, say)."""

    def __init__(self, reporters: Sequence[Any]) -> None:
        self.reporters = [r for r in reporters if r is not None]

    def start(self, total: int, step: int) -> None:
        for r in self.reporters:
            r.start(total, step)

    def advance(self, step: int) -> None:
        for r in self.reporters:
            r.advance(step)

    def log(self, record: Mapping[str, Any]) -> None:
        for r in self.reporters:
            r.log(record)

    def close(self) -> None:
        for r in self.reporters:
            r.close()

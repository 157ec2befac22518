"""train.log: [tensorboard] writes event files that TensorBoard's own reader reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from utune.engine.build import build  # noqa: E402
from utune.runs import train_run  # noqa: E402
from utune.train.metrics import read_metrics  # noqa: E402

SPEC = {
    "version": 1,
    "model": {"name": "test_vit", "num_classes": 10, "img_size": 32},
    "tuners": [{"name": "lo", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4}],
    "trainable": ["head"],
    "data": {"dataset": "digits", "augment": False, "num_workers": 0},
    "train": {"epochs": 1, "max_steps": 6, "batch_size": 32, "log_every": 2, "eval_every": 3, "log": ["tensorboard"]},
}


def test_tensorboard_events_hold_the_runs_metrics(tmp_path: Path) -> None:
    train_run(build(SPEC), tmp_path / "run", resume=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/accuracy", "train/images_per_s", "val/accuracy", "val/loss"} <= set(
        tags["scalars"]
    )
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and "split" not in r]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [s for s, _ in losses]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(logged, losses, strict=True))
    text = events.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "spec/text_summary" in tags["tensors"] and "kind: lora" in text  # the resolved spec, as text

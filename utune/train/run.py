"""Run-level entry points behind ``utune apply --train`` and ``utune eval``: a run directory holds
``spec.yaml`` (the resolved spec), ``metrics.jsonl``, ``summary.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn
from torch.utils.data import DataLoader

from utune.errors import CheckpointError
from utune.train import distributed as du
from utune.train.checkpoint import (
    STATE,
    WEIGHTS,
    check_frozen,
    has_checkpoint,
    load_trainable,
    read_state,
    read_weights,
    resolve_checkpoint,
)
from utune.train.config import DataConfig, TrainConfig
from utune.train.loop import evaluate, fit

RUNS = Path("runs")


class BuiltLike(Protocol):
    """What ``utune.api.build`` returns, as far as training needs it."""

    model: nn.Module
    spec: Any  # utune.spec.Spec: .model.name, .data (DataConfig), .train (TrainConfig)
    data_config: dict
    report: dict


def build_loaders(
    data_cfg: DataConfig, data_config: dict, train_cfg: TrainConfig, splits: Sequence[str] = ("train", "val")
) -> dict[str, DataLoader]:
    """The one place loaders are made from a spec (swap point for tests and other data back-ends)."""
    from utune.train import data

    datasets = data.build_datasets(data_cfg, data_config, splits=tuple(splits))
    return {
        name: data.build_loader(
            ds,
            train_cfg.batch_size,
            train=name == "train",
            num_workers=data_cfg.num_workers,
            seed=train_cfg.seed,
            distributed=du.world() > 1,
        )
        for name, ds in datasets.items()
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_run(built: BuiltLike, out_dir: Path, resume: bool) -> dict:
    """Train a built model as its spec says, in ``out_dir``; returns the summary of :func:`fit`.

    Under torchrun every rank calls this; rank 0's ``out_dir`` wins (each rank may have computed its
    own timestamped default) and only rank 0 writes.
    """
    from utune.spec import spec_to_yaml

    spec = built.spec
    du.setup(spec.train.device)
    try:
        out_dir = Path(du.broadcast_object(str(out_dir)))
        if not resume and has_checkpoint(out_dir / "checkpoints"):
            raise CheckpointError(
                f"{out_dir} already holds a run's checkpoints",
                hint="pass --resume to continue it, or choose another output directory",
            )
        if du.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(out_dir / "spec.yaml", spec_to_yaml(spec))
        du.barrier()
        loaders = build_loaders(spec.data, built.data_config, spec.train)
        meta = {"model": spec.model.name, "dataset": spec.data.dataset, "processes": du.world()}
        return fit(built.model, spec.train, loaders, out_dir, resume=resume, run_meta=meta)
    finally:
        du.cleanup()


def restore_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), *, which: str = "latest") -> Any:
    """Rebuild a run's model from its ``spec.yaml`` and load its checkpoint (``latest`` or ``best``).

    The frozen weights must be the ones the run trained against (checked by fingerprint); the trainable
    tensors load strictly by name. Shared by ``utune eval`` and ``utune export``.
    """
    from utune.api import build

    spec_path = Path(run_dir) / "spec.yaml"
    if not spec_path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a utune run directory (no spec.yaml)",
            hint="pass a folder made by `utune apply SPEC --train`, e.g. runs/<spec>-<time>",
        )
    folder = resolve_checkpoint(Path(run_dir), which)
    weights = read_weights(folder / WEIGHTS)
    built = build(spec_path, list(overrides))
    check_frozen(built.model, read_state(folder / STATE), folder)
    load_trainable(built.model, weights, source=folder / WEIGHTS)
    return built


def eval_run(run_dir: Path, dataset: str | None = None, split: str = "test", *, which: str = "latest") -> dict:
    """Rebuild a run's model from its ``spec.yaml``, load its checkpoint and score ``split``.

    ``dataset`` evaluates on another dataset (``data.dataset=...`` override); its classes must match the
    trained head. ``which`` is ``latest`` or ``best``.
    """
    run_dir = Path(run_dir)
    built = restore_run(run_dir, [f"data.dataset={dataset}"] if dataset else [], which=which)
    spec = built.spec
    loaders = build_loaders(spec.data, built.data_config, spec.train, splits=(split,))
    device = du.resolve_device(spec.train.device)
    result = evaluate(built.model.to(device), loaders[split], device, amp=spec.train.amp)
    folder = resolve_checkpoint(run_dir, which)
    return {"run": str(run_dir), "checkpoint": str(folder), "dataset": spec.data.dataset, "split": split, **result}


def default_run_dir(spec_name: str | Path, base: Path = RUNS) -> Path:
    """``runs/<spec-stem>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``... if that second is taken)."""
    stem = Path(str(spec_name)).stem or "run"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base / name, 2
    while path.exists():
        path, n = base / f"{name}-{n}", n + 1
    return path


def latest_run(base: Path = RUNS) -> Path:
    """The most recently started (or resumed) run under ``base``: the newest ``spec.yaml``."""
    base = Path(base)
    runs = [d for d in base.iterdir() if (d / "spec.yaml").is_file()] if base.is_dir() else []
    if not runs:
        raise CheckpointError(
            f"no training runs under {base}/",
            hint="train one with `utune apply SPEC --train`, or pass the run directory explicitly",
        )
    return max(runs, key=lambda d: ((d / "spec.yaml").stat().st_mtime_ns, d.name))

"""Multi-task training: K tasks, each its own spec and dataset, trained on one backbone with one shared pass.

``utune.train_sets({"digits": "a.yaml", "fmnist": "b.yaml"}, "runs/mt")`` (``utune multitask``) builds the
tasks' tuner sets on one backbone (:func:`utune.engine.sets.build_sets`) and trains them together. Each step takes
one batch from every task's training loader (its own dataset, transform, batch size), concatenates them,
runs what no task's tuners reach once on all the rows (for Res-Tuning-Bypass tasks: the whole frozen
backbone), and each task's tuners and head on its own rows only (:meth:`TunerSets.forward_sets` with
``rows``). The loss is the sum of the tasks' mean losses; each task has its own optimizer and schedule
from its own spec (``train.lr``, ``optimizer``, ``weight_decay``, ``warmup_epochs``...), so its tensors
get exactly its own loss's gradients and its own updates, as in a run of its own on the same batches.

Every task runs the same number of steps: ``steps``, else the largest ``epochs x steps per epoch`` among
the tasks (a smaller dataset is gone through more often). At the end each task is evaluated on its test
split and written as an ordinary run folder, ``OUT/<task>/`` (``spec.yaml``, ``checkpoints/``,
``summary.json``): ``utune eval OUT/<task>`` and ``utune export OUT/<task> --tuners-only`` work on it as on
any run. ``OUT/multitask.json`` has every task's accuracy and the step time. Not resumable (yet): nothing
is written before the end, so an interrupted multi-task run (Ctrl-C stops it at once) leaves no folder and
starts again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from utune._fs import make_dir, write_text_atomic
from utune.errors import UserInputError

Progress = Callable[[int, int, Mapping[str, float]], None]  # (step, total, each task's loss)


@dataclass
class _Task:
    name: str
    built: Any
    loaders: dict[str, DataLoader]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    batches: Iterator[Any] = field(default_factory=lambda: iter(()))
    epochs: int = 0

    def next_batch(self) -> Any:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch: the loader reshuffles
            self.epochs += 1
            self.batches = iter(self.loaders["train"])
            return next(self.batches)


def _check_backbones(sets: Any) -> None:
    """Each task's run folder rebuilds the backbone from its own spec: a randomly initialised one must then
    come out the same for every task, and timm's init draws depend on the seed and on the class count."""
    specs = {n: b.spec for n, b in sets.built.items()}
    first = next(iter(specs.values()))
    for name, spec in specs.items():
        if spec.train.bn_train:
            raise UserInputError(
                f"task {name!r} sets train.bn_train: true, but the backbone's batch norms are shared: their "
                "statistics would mix every task's images",
                hint="leave train.bn_train false for multi-task training (the frozen norms keep their statistics)",
            )
    if first.model.pretrained:
        return
    for name, spec in specs.items():
        for key, a, b in (
            ("train.seed", first.train.seed, spec.train.seed),
            ("model.num_classes", first.model.num_classes, spec.model.num_classes),
        ):
            if a != b:
                raise UserInputError(
                    f"task {name!r} has {key} {b}, the first task {a}, and the backbone is randomly initialised "
                    "(model.pretrained: false): timm's init of it depends on both, so that task's run folder "
                    "would rebuild another backbone",
                    hint="train from pre-trained weights (model.pretrained: true, or a weights file), or give "
                    f"every task the same {key}",
                )


def _tasks(sets: Any, steps: int | None, device: torch.device) -> tuple[list[_Task], int]:
    from utune.runs import build_loaders
    from utune.train.loop import _total_steps
    from utune.train.optim import build_optimizer, build_scheduler

    loaders = {}
    for name, built in sets.built.items():
        spec = built.spec
        loaders[name] = build_loaders(spec.data, built.data_config, spec.train, ("train", "test"))
    total = steps or max(_total_steps(b.spec.train, len(loaders[n]["train"])) for n, b in sets.built.items())
    tasks = []
    for name, built in sets.built.items():
        cfg, model = built.spec.train, sets.sets[name]
        optimizer = build_optimizer(model, cfg, device)
        scheduler = build_scheduler(optimizer, cfg, total_steps=total, steps_per_epoch=len(loaders[name]["train"]))
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        tasks.append(_Task(name, built, loaders[name], optimizer, scheduler, criterion))
    return tasks, total


def _step(sets: Any, tasks: list[_Task], device: torch.device) -> dict[str, float]:
    from utune.train.loop import _to_device

    xs, ys, rows, start = [], {}, {}, 0
    for t in tasks:
        x, y = _to_device(t.next_batch(), device, False, getattr(t.loaders["train"], "input_norm", None))
        xs.append(x)
        ys[t.name], rows[t.name] = y, slice(start, start + len(x))
        start += len(x)
    out = sets.forward_sets(torch.cat(xs), [t.name for t in tasks], rows)
    losses = {t.name: t.criterion(out[t.name].float(), ys[t.name]) for t in tasks}
    cast(torch.Tensor, sum(losses.values())).backward()
    for t in tasks:
        if t.built.spec.train.clip_grad is not None:
            params = [p for p in sets.sets[t.name].parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, t.built.spec.train.clip_grad)
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
    return {n: float(v.detach()) for n, v in losses.items()}


def train_sets(
    sources: Mapping[str, Any],
    out_dir: Path | str,
    *,
    steps: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train every task of ``sources`` (name -> spec path, dict or Spec) together in ``out_dir``; returns
    the contents of ``out_dir/multitask.json``. See the module docstring."""
    from utune.engine.sets import build_sets, check_set_names
    from utune.train import distributed as du
    from utune.train.checkpoint import has_checkpoint
    from utune.train.loop import _private_rng, freeze_batchnorm, seed_everything

    check_set_names(sources)  # before any folder is named after one
    out_dir = Path(out_dir)
    if (out_dir / "multitask.json").exists() or any(has_checkpoint(out_dir / n / "checkpoints") for n in sources):
        raise UserInputError(f"{out_dir} already holds a multi-task run", hint="choose another --out folder")
    sets = build_sets(sources)
    _check_backbones(sets)
    first = next(iter(sets.built.values())).spec.train
    device = du.resolve_device(first.device)
    with _private_rng():
        seed_everything(first.seed)
        tasks, total = _tasks(sets, steps, device)
        sets.to(device).train()
        if not first.bn_train:
            freeze_batchnorm(sets)
        t0, log = time.perf_counter(), []
        for step in range(1, total + 1):
            losses = _step(sets, tasks, device)
            if step % first.log_every == 0 or step == total:
                log.append({"step": step, "loss": losses})
                if progress is not None:
                    progress(step, total, losses)
        train_s = time.perf_counter() - t0
    return _finish(sets, tasks, out_dir, total, train_s, log, device)


def _finish(
    sets: Any, tasks: list[_Task], out_dir: Path, total: int, train_s: float, log: list[Any], device: torch.device
) -> dict[str, Any]:
    from utune.train.loop import evaluate

    make_dir(out_dir, "multi-task run folder")
    images = sum(total * int(t.loaders["train"].batch_size or 0) for t in tasks)
    doc: dict[str, Any] = {
        "steps": total,
        "tasks": {},
        "train_s": round(train_s, 3),
        "step_s": round(train_s / max(total, 1), 4),
        "images_per_s": round(images / train_s, 1) if train_s > 0 else None,
    }
    for t in tasks:
        model = sets.sets[t.name]
        scores = {
            split: evaluate(model, loader, device, amp=t.built.spec.train.amp)
            for split, loader in t.loaders.items()
            if split != "train"
        }
        _write_task(out_dir / t.name, t, model, total, scores)
        doc["tasks"][t.name] = {
            "dataset": t.built.spec.data.dataset,
            "rows": t.loaders["train"].batch_size,
            "epochs": round(total / len(t.loaders["train"]), 2),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **{f"{split}_acc": s["acc"] for split, s in scores.items()},
            "run": str(out_dir / t.name),
        }
    doc["log"] = log
    write_text_atomic(out_dir / "multitask.json", json.dumps(doc, indent=2) + "\n", what="multi-task summary")
    return doc


def _write_task(folder: Path, t: _Task, model: nn.Module, total: int, scores: Mapping[str, Any]) -> None:
    """``folder`` as an ordinary run: its spec, a checkpoint of its trainable tensors, a summary."""
    from utune.spec import spec_to_yaml
    from utune.train.checkpoint import frozen_fingerprint, save_checkpoint, trainable_state
    from utune.train.state import TrainState

    cfg = t.built.spec.train
    make_dir(folder, "task run folder")
    write_text_atomic(folder / "spec.yaml", spec_to_yaml(t.built.spec), what="run spec")
    state = TrainState(len(t.loaders["train"]), cfg.batch_size, 1, 1, cfg.seed, step=total)
    state.frozen = frozen_fingerprint(model)
    state.meta = {"model": t.built.model_label, "dataset": t.built.spec.data.dataset, "multitask": True}
    state.optimizer, state.scheduler = t.optimizer.state_dict(), t.scheduler.state_dict()
    save_checkpoint(folder / "checkpoints", step=total, weights=trainable_state(model), state=state.to_dict())
    summary = {"step": total, **{f"final_{s}_acc": v["acc"] for s, v in scores.items()}, "out_dir": str(folder)}
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n", what="run summary")

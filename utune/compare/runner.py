"""One run of a comparison: an ordinary run directory (``train_run``), scored on one split, with its
result in ``result.json``. A run whose ``result.json`` records the same resolved spec is not redone; one
that stopped half-way (a checkpoint, no result) is resumed exactly."""

from __future__ import annotations

import json
import resource
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT = "result.json"


@dataclass(frozen=True)
class RunTask:
    """What one worker needs: the spec file, every override, where the run lives and what it scores."""

    method: str
    kind: str  # "select" (scored on the carved val split) or "final" (scored on test)
    spec: str
    overrides: tuple[str, ...]
    run_dir: str
    point: dict[str, Any] = field(default_factory=dict)  # the grid point this run tries
    seed: int = 0
    probe_memory: bool = False

    @property
    def split(self) -> str:
        return "val" if self.kind == "select" else "test"


def load_task_spec(task: RunTask) -> Any:
    from utune.spec import load_spec

    return load_spec(task.spec, list(task.overrides))


def cached(task: RunTask, spec_hash: str) -> dict[str, Any] | None:
    """The recorded result when the run is finished with this very spec."""
    path = Path(task.run_dir) / RESULT
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("spec_hash") == spec_hash and "error" not in result else None


def execute(task: RunTask) -> dict[str, Any]:
    """Train and score one run; every failure comes back as ``{"error": ...}``, a stop request (SIGINT,
    SIGTERM: a checkpoint was written at the step it came) as ``{"interrupted": signal, ...}``."""
    from utune.errors import Interrupted, UtuneError

    t0 = time.perf_counter()
    try:
        result = _train_and_score(task)
    except Interrupted as e:
        result = {"interrupted": e.exit_code - 128, "error": e.message}
    except UtuneError as e:
        result = {"error": e.message + (f" ({e.hint})" if e.hint else "")}
    except Exception as e:  # a method that crashes must not stop the others
        where = traceback.extract_tb(e.__traceback__)[-1]
        result = {"error": f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"}
    result.update(task=asdict(task), wall_s=round(time.perf_counter() - t0, 3))
    return result


def _train_and_score(task: RunTask) -> dict[str, Any]:
    from utune._fs import write_text_atomic
    from utune.data import open_datasets, scored_split
    from utune.engine.build import build
    from utune.runs import check_classes, check_resume_spec, train_run
    from utune.spec import load_spec, spec_hash
    from utune.train.checkpoint import has_checkpoint

    spec = load_task_spec(task)
    digest = spec_hash(spec)
    done = cached(task, digest)
    if done is not None:
        return {**done, "reused": True}
    run_dir = Path(task.run_dir)
    # final runs score test, or val (named so) where the data has no test split (a folder without test/)
    split = task.split if task.split != "test" else scored_split(spec.data, None)[0]
    opened = open_datasets(spec.data, splits=("train", split))  # the test split only for final runs
    if spec.model.num_classes is None:
        spec = load_spec(spec, [f"model.num_classes={opened.classes}"])
    resume = has_checkpoint(run_dir / "checkpoints")
    if resume:
        check_resume_spec(run_dir, spec)
    built = build(spec)
    check_classes(built, opened.classes, spec.data.dataset)
    datasets = opened.attach(built.data_config, device_normalize=True)  # train_run normalises on the device
    summary = train_run(built, run_dir, resume, datasets={"train": datasets["train"]})
    scored = score(built, datasets[split])
    result = {
        "spec_hash": digest,
        "split": split,
        "acc": scored["acc"],
        "loss": scored["loss"],
        "n": scored["n"],
        "n_train": len(datasets["train"]),  # type: ignore[arg-type]  # map-style datasets have a length
        "trainable_params": built.report["trainable_params"],
        "total_params": built.report["total_params"],
        "trainable_pct": built.report["trainable_pct"],
        "steps": summary["step"],
        "train_time_s": summary["time_s"],
        "images_per_s": summary["images_per_s"],
        "step_time_s": _step_time(summary, spec.train),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if task.probe_memory:
        result["peak_tensor_bytes"] = probe_memory(built, datasets["train"])
    write_text_atomic(run_dir / RESULT, json.dumps(result, indent=2) + "\n", what="run result")
    return result


def _step_time(summary: dict[str, Any], cfg: Any) -> float | None:
    """Seconds per optimizer step from the run's own metrics (training only: no evaluation or checkpoints)."""
    ips = summary.get("images_per_s")
    return cfg.batch_size * cfg.grad_accum / ips if ips else None


def score(built: Any, dataset: Any, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy and loss of the model as trained (the run's final checkpoint) on every image of ``dataset``."""
    from utune.data import build_loader
    from utune.train import distributed as du
    from utune.train.loop import evaluate

    cfg = built.spec
    from utune.runs import input_norm

    loader = build_loader(dataset, batch_size, train=False, num_workers=0, seed=cfg.train.seed, distributed=False)
    device = du.resolve_device(cfg.train.device)
    norm = input_norm(built.data_config)
    return evaluate(built.model.to(device), loader, device, amp=cfg.train.amp, input_norm=norm)


def probe_memory(built: Any, dataset: Any) -> int:
    """Peak live tensor bytes of two training steps of the run's model, optimizer and batch size (see
    :mod:`utune.compare.memory`); run after scoring: the steps change the weights."""
    import torch.nn.functional as F

    from utune.data import build_loader
    from utune.runs import input_norm
    from utune.train import distributed as du
    from utune.train.loop import freeze_batchnorm
    from utune.train.optim import build_optimizer

    from .memory import peak_training_bytes

    cfg = built.spec.train
    device = du.resolve_device(cfg.device)
    model = built.model.to(device).train()
    if not cfg.bn_train:
        freeze_batchnorm(model)
    optimizer = build_optimizer(model, cfg, device)
    loader = build_loader(dataset, cfg.batch_size, train=True, num_workers=0, seed=cfg.seed, distributed=False)
    x, y = next(iter(loader))
    x, y = input_norm(built.data_config)(x.to(device)), y.to(device)

    def step() -> None:
        F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return peak_training_bytes(model, step)


def init_worker(threads: int | None) -> None:
    """A pool worker: its own torch thread count, no progress output; Ctrl-C (which reaches the whole
    process group) and SIGTERM stop its training at the next step, with a checkpoint there."""
    import os
    import signal

    from utune import _signals

    os.environ["UTUNE_QUIET"] = "1"
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _signals._graceful)
    if threads:
        import torch

        torch.set_num_threads(threads)

"""The training loop: ``fit`` trains the trainable parameters of a surgically tuned model, ``evaluate``
scores it. Resumable to the bit on CPU: see :mod:`utune.train.sampling` and :mod:`utune.train.checkpoint`.

Counting conventions: a *step* is one optimizer update (``grad_accum`` micro-batches of
``batch_size`` images on each of ``world`` processes); ``steps_per_epoch`` drops the tail that does not
fill a whole step, so every epoch and every rank runs the same steps.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from utune.errors import CheckpointError, DataError
from utune.train import distributed as du
from utune.train.checkpoint import (
    WEIGHTS,
    check_frozen,
    frozen_fingerprint,
    has_checkpoint,
    load_checkpoint,
    load_trainable,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from utune.train.config import TrainConfig
from utune.train.metrics import MetricsLog, ProgressBar, print_summary
from utune.train.optim import build_optimizer, build_scheduler
from utune.train.sampling import ResumableSampler, SeededDataset, ShardSampler, mix_seed, rebuild_loader

STATE_VERSION = 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), numpy and random."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put BatchNorm layers with no trainable affine parameters in eval mode; returns how many.

    Their running statistics belong to the frozen backbone; updating them from a small downstream set
    in train mode would silently change the "frozen" model. Selected by type, so it works on any tree.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    # bf16 needs no loss scaling; on CPU autocast would only slow the tiny matmuls down.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = batch[0], batch[1]
    except (TypeError, IndexError, KeyError):
        raise DataError(f"a data loader batch must be (images, labels); got {type(batch).__name__}") from None
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True).long()


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device | str, *, amp: bool = True, channels_last: bool = False
) -> dict[str, float | int]:
    """Top-1 accuracy and mean cross-entropy over ``loader``, summed over all DDP ranks.

    Under DDP each rank must see a disjoint shard with no padding (``fit`` arranges that); the counts,
    not per-rank means, are all-reduced, so the result is exact for any shard sizes.
    """
    device = torch.device(device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    try:
        with torch.no_grad(), _autocast(device, amp):
            for batch in loader:
                x, y = _to_device(batch, device, channels_last and device.type == "cuda")
                logits = model(x).float()
                totals[0] += (logits.argmax(dim=-1) == y).sum()
                totals[1] += F.cross_entropy(logits, y, reduction="sum")
                totals[2] += y.numel()
    finally:
        for m, mode in modes.items():
            m.training = mode
    du.all_reduce_sum(totals)
    correct, loss_sum, n = totals.tolist()
    if n == 0:
        raise DataError("the evaluation split has no images")
    return {"acc": correct / n, "loss": loss_sum / n, "n": int(n)}


@dataclass
class _Plan:
    batch_size: int
    grad_accum: int
    world: int
    steps_per_epoch: int
    total_steps: int


def _prepare_loaders(
    loaders: Mapping[str, DataLoader], cfg: TrainConfig, rank: int, world: int
) -> tuple[DataLoader, ResumableSampler, dict[str, DataLoader], _Plan]:
    """Our train loader (resumable order, per-sample seeds) and unpadded, sharded eval loaders."""
    if "train" not in loaders:
        raise DataError(f"fit needs a 'train' loader; got {sorted(loaders)}")
    train = loaders["train"]
    try:
        n = len(train.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError("training needs a map-style dataset (one with __len__ and __getitem__)") from None
    bs = train.batch_size or cfg.batch_size
    sampler = ResumableSampler(n, seed=cfg.seed, rank=rank, world=world)
    train_loader = rebuild_loader(
        train,
        dataset=SeededDataset(train.dataset, cfg.seed),
        sampler=sampler,
        batch_size=bs,
        drop_last=True,
        generator_seed=mix_seed(cfg.seed, rank, 1),
    )
    spe = (sampler.per_rank // bs) // cfg.grad_accum
    if spe == 0:
        raise DataError(
            f"the training set ({n} images) is smaller than one step "
            f"(batch_size {bs} x grad_accum {cfg.grad_accum} x {world} processes)",
            hint="lower train.batch_size or train.grad_accum",
        )
    if cfg.epochs:
        total = spe * cfg.epochs if cfg.max_steps is None else min(spe * cfg.epochs, cfg.max_steps)
    else:
        total = cfg.max_steps or 0
    evals = {}
    for name, loader in loaders.items():
        if name == "train":
            continue
        evals[name] = rebuild_loader(
            loader,
            dataset=loader.dataset,
            sampler=ShardSampler(len(loader.dataset), rank=rank, world=world),  # type: ignore[arg-type]
            batch_size=loader.batch_size or bs,
            drop_last=False,
            generator_seed=mix_seed(cfg.seed, rank, 2),
        )
    return train_loader, sampler, evals, _Plan(bs, cfg.grad_accum, world, spe, total)


def _check_resumable(state: Mapping[str, Any], plan: _Plan, model: nn.Module, folder: Path) -> None:
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{folder / 'state.pt'} has format version {state.get('version')}, not {STATE_VERSION}")
    for key in ("world", "batch_size", "grad_accum", "steps_per_epoch"):
        if state.get(key) != getattr(plan, key):
            raise CheckpointError(
                f"cannot resume {folder}: it was trained with {key}={state.get(key)}, this run has "
                f"{getattr(plan, key)}",
                hint="resume with the same batch size, grad_accum, process count and dataset",
            )
    check_frozen(model, state, folder)


def _json_safe(obj: Any) -> Any:
    # Run metadata goes into state.pt (weights_only) and summary.json: keep only plain JSON values.
    return json.loads(json.dumps(obj, default=str)) if obj is not None else None


class _Window:
    """Loss/accuracy/throughput since the last log line, kept on the device to avoid per-step syncs.

    The sums survive evaluation and checkpoints (and go into the checkpoint), so a log line reports
    the same numbers whether or not the run was interrupted in the middle of its window.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, batches, correct, seen
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.seconds = 0.0
        self.start: float | None = time.perf_counter()

    def pause(self) -> None:
        if self.start is not None:
            self.seconds += time.perf_counter() - self.start
            self.start = None

    def resume(self) -> None:
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        correct = (logits.detach().argmax(dim=-1) == y).sum()
        one = torch.ones((), dtype=torch.float64, device=self.device)
        self.sums += torch.stack([loss.detach().double(), one, correct.double(), one * y.numel()])

    def collect(self) -> tuple[float, float, int, float]:
        """(mean loss, accuracy, images, training seconds) over all ranks; a collective call."""
        self.pause()
        sums = du.all_reduce_sum(self.sums.clone()).tolist()
        return sums[0] / max(sums[1], 1), sums[2] / max(sums[3], 1), int(sums[3]), self.seconds


def fit(
    model: nn.Module,
    train_cfg: TrainConfig,
    loaders: dict[str, DataLoader],
    out_dir: Path,
    *,
    resume: bool = False,
    run_meta: dict | None = None,
) -> dict:
    """Train ``model``'s trainable parameters; write metrics and checkpoints under ``out_dir``.

    ``loaders["train"]`` supplies the dataset, batch size and worker settings; its sampler is replaced
    by a resumable one. Every other entry (``val``, ``test``) is evaluated at each epoch end, every
    ``eval_every`` steps and at the end. Returns the run summary (also ``out_dir/summary.json``).
    """
    cfg = train_cfg
    out_dir = Path(out_dir)
    device = du.setup(cfg.device)
    rank, world = du.rank(), du.world()
    main = rank == 0
    ckpt_dir = out_dir / "checkpoints"
    if not resume and has_checkpoint(ckpt_dir):
        raise CheckpointError(
            f"{out_dir} already holds a run's checkpoints",
            hint="pass --resume to continue it, or choose another output directory",
        )
    cuda = device.type == "cuda"
    channels_last = cfg.channels_last and cuda
    train_loader, sampler, eval_loaders, plan = _prepare_loaders(loaders, cfg, rank, world)
    spe, total = plan.steps_per_epoch, plan.total_steps

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(mix_seed(cfg.seed, rank))  # ranks draw different dropout masks
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps=max(total, 1), steps_per_epoch=spe)

    step, records, best, saved_rank = 0, [], None, None
    elapsed = train_time = 0.0
    images, last_loss = 0, None
    if resume:
        weights, state, folder = load_checkpoint(ckpt_dir)
        _check_resumable(state, plan, model, folder)
        load_trainable(model, weights, source=folder / WEIGHTS)
        saved_names = [g.get("param_names") for g in state["optimizer"]["param_groups"]]
        if saved_names != [g["param_names"] for g in optimizer.param_groups]:
            raise CheckpointError(
                f"cannot resume {folder}: its optimizer state belongs to other parameter groups",
                hint="resume with the same trainable parameters and weight decay, or start without --resume",
            )
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"cannot restore the optimizer from {folder / 'state.pt'}: {e}",
                hint="resume with the same optimizer and trainable parameters, or start without --resume",
            ) from None
        step, records, best = int(state["step"]), list(state["metrics"]), state["best"]
        elapsed, train_time = float(state["elapsed"]), float(state["train_time"])
        images, last_loss = int(state["images"]), state["last_loss"]
        saved_rank = state["ranks"][rank]  # this rank's RNG streams and partial log window
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=main, records=records)

    ddp: DDP | None = None
    train_model: nn.Module = model
    if world > 1:
        # Frozen parameters do not require grad, so DDP neither reduces them nor expects their grads:
        # find_unused_parameters=False holds as long as every trainable parameter is used.
        ddp = DDP(model, device_ids=[device.index] if cuda else None, find_unused_parameters=False)
        train_model = ddp
    if cfg.compile:
        train_model = torch.compile(train_model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro_per_step = plan.grad_accum * plan.batch_size  # samples one rank consumes per step
    best_split = "val" if "val" in eval_loaders else next(iter(eval_loaders), None)
    keep_best = getattr(cfg, "keep_best", True)
    meta = _json_safe(run_meta)

    def log_eval(epoch_f: float) -> bool:
        nonlocal best
        improved = False
        for split, loader in eval_loaders.items():
            res = evaluate(model, loader, device, amp=cfg.amp, channels_last=channels_last)
            metrics.write({"step": step, "epoch": epoch_f, "split": split, "acc": res["acc"], "loss": res["loss"]})
            if split == best_split and (best is None or res["acc"] > best["acc"]):
                best = {"split": split, "acc": res["acc"], "step": step}
                improved = True
        return improved

    def checkpoint(tags: list[str]) -> None:
        ranks = du.all_gather_object({"rng": rng_state(), "window": window.sums.tolist()})
        du.barrier()
        if main:
            state = {
                "version": STATE_VERSION, "step": step, "epoch": step // spe, "seed": cfg.seed,
                "world": world, "batch_size": plan.batch_size, "grad_accum": plan.grad_accum,
                "steps_per_epoch": spe, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ranks": ranks, "sampler": {"epoch": step // spe, "skip": (step % spe) * micro_per_step},
                "metrics": metrics.records, "best": best, "elapsed": elapsed + (time.perf_counter() - t0),
                "train_time": train_time, "images": images, "last_loss": last_loss,
                "frozen": frozen_fingerprint(model), "meta": meta,
            }  # fmt: skip
            save_checkpoint(ckpt_dir, step=step, weights=trainable_state(model), state=state, tags=tags)
        du.barrier()

    def set_train_mode() -> None:
        train_model.train()
        if not cfg.bn_train:
            freeze_batchnorm(model)

    bar = ProgressBar(total, start=step, enabled=main)
    window = _Window(device)
    t0 = time.perf_counter()
    if saved_rank is not None:
        window.sums.copy_(torch.tensor(saved_rank["window"], dtype=torch.float64))
        set_rng_state(saved_rank["rng"])  # last, so nothing above draws from the restored streams
    try:
        while step < total:
            epoch = step // spe
            sampler.set_epoch(epoch, skip=(step - epoch * spe) * micro_per_step)
            set_train_mode()
            window.resume()
            for micro, batch in enumerate(train_loader, start=1):
                x, y = _to_device(batch, device, channels_last)
                sync = micro % plan.grad_accum == 0
                no_sync = ddp.no_sync() if (ddp is not None and not sync) else contextlib.nullcontext()
                with no_sync:
                    with _autocast(device, cfg.amp):
                        logits = train_model(x)
                    loss = criterion(logits.float(), y)
                    (loss / plan.grad_accum).backward()
                window.add(loss, logits, y)
                if not sync:
                    continue
                if cfg.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_end = step % spe == 0
                epoch_f = round(step / spe, 4)
                if step % cfg.log_every == 0 or step == total or epoch_end:
                    mean_loss, acc, n_img, secs = window.collect()
                    images += n_img
                    train_time += secs
                    last_loss = mean_loss
                    ips = n_img / max(secs, 1e-9)
                    metrics.write({"step": step, "epoch": epoch_f, "loss": mean_loss, "lr": lr,
                                   "images_per_s": ips, "time": elapsed + time.perf_counter() - t0})  # fmt: skip
                    bar.update(step, loss=mean_loss, acc=acc, ips=ips)
                    window.reset()
                else:
                    bar.update(step)
                window.pause()
                eval_due = bool(eval_loaders) and (
                    epoch_end or step == total or (cfg.eval_every is not None and step % cfg.eval_every == 0)
                )
                improved = log_eval(epoch_f) if eval_due else False
                tags = []
                if epoch_end or step == total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    tags.append("latest")
                if improved and keep_best:
                    tags.append("best")
                if tags:
                    checkpoint(tags)
                if eval_due or tags:
                    set_train_mode()
                window.resume()  # evaluation and checkpoint time are not training throughput
                if epoch_end or step >= total:
                    break
        if total == 0 and eval_loaders:
            log_eval(0.0)  # epochs=0 without max_steps: just score the model as built
    finally:
        bar.close()
        metrics.close()
    elapsed += time.perf_counter() - t0
    final = {r["split"]: r["acc"] for r in metrics.records if "split" in r and r["step"] == step}
    summary = {
        "step": step,
        "epoch": round(step / spe, 4),
        "train_loss": last_loss,
        "best_val_acc": best["acc"] if best else None,
        "best_step": best["step"] if best else None,
        "final_val_acc": final.get(best_split) if best_split else None,
        "time_s": round(elapsed, 3),
        "images_per_s": images / train_time if train_time > 0 else None,
        "trainable_params": sum(p.numel() for p in trainable),
        "out_dir": str(out_dir),
    }
    summary.update({f"final_{s}_acc": a for s, a in final.items() if s != best_split})
    if meta is not None:
        summary["meta"] = meta
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary

"""The training loop: a :class:`Trainer` trains the trainable parameters of a surgically tuned model,
``evaluate`` scores it. Resumable to the bit on CPU: see :mod:`utune.train.sampling`,
:mod:`utune.train.checkpoint` and :mod:`utune.train.state` (the checkpoint's schema).

Counting conventions: a *step* is one optimizer update (``grad_accum`` micro-batches of
``batch_size`` images on each of ``world`` processes); ``steps_per_epoch`` drops the tail that does not
fill a whole step, so every epoch and every rank runs the same steps.

The loop prints nothing. It writes ``metrics.jsonl``, checkpoints and ``summary.json`` and tells a
:class:`Reporter` (the CLI's progress display, or nothing) what happened; the caller renders the summary.
A stop request (:func:`utune._signals.stop_requested`, set by SIGINT/SIGTERM under the CLI) is honoured
at the next step boundary: a checkpoint is written there and :class:`~utune.errors.TrainingInterrupted`
raised, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from utune._fs import write_text_atomic
from utune._signals import last_signal, stop_acknowledged, stop_requested
from utune.errors import CheckpointError, DataError, DistributedError, TrainingDiverged, TrainingInterrupted
from utune.spec.sections import TrainConfig
from utune.train import distributed as du
from utune.train import fsdp
from utune.train.checkpoint import (
    STATE,
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
from utune.train.evaluate import Preprocess, _autocast, _label_error, _peer_failed, _to_device, evaluate
from utune.train.memory import release_freed_memory
from utune.train.metrics import MetricsLog
from utune.train.optim import build_optimizer, build_scheduler
from utune.train.sampling import ResumableSampler, SeededDataset, ShardSampler, mix_seed, rebuild_loader
from utune.train.state import STATE_VERSION, TrainState

__all__ = ["STATE_VERSION", "Reporter", "Trainer", "evaluate", "fit", "freeze_batchnorm", "seed_everything"]


class Reporter(Protocol):
    """What a training run tells its caller, as it happens (records are those of ``metrics.jsonl``)."""

    def start(self, total: int, step: int) -> None: ...
    def advance(self, step: int) -> None: ...
    def log(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    """The library default: tell no one."""

    def start(self, total: int, step: int) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


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


@dataclass
class _Plan:
    batch_size: int
    grad_accum: int
    world: int
    steps_per_epoch: int
    total_steps: int


def _total_steps(cfg: TrainConfig, spe: int) -> int:
    if cfg.epochs:
        return spe * cfg.epochs if cfg.max_steps is None else min(spe * cfg.epochs, cfg.max_steps)
    return cfg.max_steps or 0


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
    evals = {
        name: rebuild_loader(
            loader,
            dataset=loader.dataset,
            sampler=ShardSampler(len(loader.dataset), rank=rank, world=world),  # type: ignore[arg-type]
            batch_size=loader.batch_size or bs,
            drop_last=False,
            generator_seed=mix_seed(cfg.seed, rank, 2),
        )
        for name, loader in loaders.items()
        if name != "train"
    }
    return train_loader, sampler, evals, _Plan(bs, cfg.grad_accum, world, spe, _total_steps(cfg, spe))


def _json_safe(obj: Any) -> Any:
    # Run metadata goes into state.pt (weights_only) and summary.json: keep only plain JSON values.
    return json.loads(json.dumps(obj, default=str)) if obj is not None else None


class _Window:
    """Loss/accuracy/throughput since the last log line, kept on the device to avoid per-step syncs.

    The sums survive evaluation and checkpoints (and go into the checkpoint), so a log line reports
    the same numbers whether or not the run was interrupted in the middle of its window. Throughput
    leaves out what :meth:`untime` removed (warm-up steps): their images and their seconds.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, batches, correct, seen
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.seconds = 0.0
        self.untimed = 0.0  # this rank's images of the window that are not in the throughput
        self.start: float | None = time.perf_counter()

    def pause(self) -> None:
        if self.start is not None:
            self.seconds += time.perf_counter() - self.start
            self.start = None

    def resume(self) -> None:
        self.start = time.perf_counter()

    def untime(self) -> float:
        """Take everything in the window so far out of the throughput; returns the seconds taken out."""
        running = self.start is not None
        self.pause()
        seconds, self.seconds = self.seconds, 0.0
        self.untimed = float(self.sums[3].item())  # one sync per warm-up step
        if running:
            self.resume()
        return seconds

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        correct = (logits.detach().argmax(dim=-1) == y).sum()
        one = torch.ones((), dtype=torch.float64, device=self.device)
        self.sums += torch.stack([loss.detach().double(), one, correct.double(), one * y.numel()])

    def collect(self) -> tuple[float, float, int, int, float]:
        """(mean loss, accuracy, images, timed images, training seconds) over all ranks; a collective call."""
        self.pause()
        untimed = torch.tensor([self.untimed], dtype=torch.float64, device=self.device)
        sums = du.all_reduce_sum(torch.cat([self.sums, untimed])).tolist()
        images = int(sums[3])
        return sums[0] / max(sums[1], 1), sums[2] / max(sums[3], 1), images, images - int(sums[4]), self.seconds


# The first optimizer step of every process (a fresh run, or a resumed one) is warm-up: torch.compile
# compiles there (~46 s on CPU for test_vit, against ~10 ms a step), CUDA initialises its context, cuDNN
# and the allocator settle. Its images and seconds stay out of images_per_s; the summary says how many.
WARMUP_STEPS = 1


class Trainer:
    """One training run in ``out_dir``: build with the model and loaders, :meth:`restore` to resume,
    :meth:`fit` to train; returns the run summary (also ``out_dir/summary.json``).

    ``loaders["train"]`` supplies the dataset, batch size and worker settings; its sampler is replaced by
    a resumable one. Every other entry (``val``, ``test``) is evaluated at each epoch end, every
    ``eval_every`` steps and at the end; the ``val`` split (else the first) decides the best checkpoint.
    ``input_norm`` turns uint8 batches into the model's normalised input on the device
    (:class:`utune.data.InputNorm`; float batches pass unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loaders: Mapping[str, DataLoader],
        out_dir: Path,
        *,
        run_meta: dict | None = None,
        reporter: Reporter | None = None,
        input_norm: Preprocess | None = None,
    ) -> None:
        self.model, self.cfg, self.out_dir = model, cfg, Path(out_dir)
        # uint8 batches become the model's input on the device: given, or as the loaders say (utune.runs)
        self.input_norm = input_norm if input_norm is not None else getattr(loaders.get("train"), "input_norm", None)
        self.device = du.setup(cfg.device)
        if cfg.release_freed_memory:
            release_freed_memory()  # before the step's first allocations
        self.rank, self.world = du.rank(), du.world()
        self.main = self.rank == 0
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        self.train_loader, self.sampler, self.evals, plan = _prepare_loaders(loaders, cfg, self.rank, self.world)
        self.total = plan.total_steps
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        seed_everything(mix_seed(cfg.seed, self.rank))  # ranks draw different dropout masks
        self.frozen = frozen_fingerprint(model)  # before sharding: of the whole tensors
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp"
        if self.fsdp:
            fsdp.shard(model)  # before the optimizer, which must see the sharded parameters
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.scheduler = build_scheduler(
            self.optimizer, cfg, total_steps=max(self.total, 1), steps_per_epoch=plan.steps_per_epoch
        )
        self.state = TrainState(
            plan.steps_per_epoch, plan.batch_size, plan.grad_accum, plan.world, cfg.seed, meta=_json_safe(run_meta)
        )
        self.state.frozen = self.frozen
        self.reporter: Reporter = reporter or SilentReporter()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.best_split = "val" if "val" in self.evals else next(iter(self.evals), None)
        self.window = _Window(self.device)
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self._rank_state: dict[str, Any] | None = None
        self._elapsed0 = 0.0
        self._t0 = time.perf_counter()
        self._steps_here = 0  # optimizer steps run by this process (warm-up is counted from here)
        self.warmup_s = 0.0  # seconds of this process's warm-up steps, compilation included

    # ----- resume --------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``out_dir``'s latest checkpoint: weights, optimizer, schedule, counters, RNG."""
        weights, data, folder = load_checkpoint(self.ckpt_dir)
        saved = TrainState.from_dict(data, folder / STATE)
        saved.check_plan(self.state, folder)
        check_frozen(self.model, data, folder, now=self.frozen)
        if ("fsdp" in saved.optimizer) != self.fsdp:
            raise CheckpointError(
                f"cannot resume {folder} with train.parallel={self.cfg.parallel}: it was trained "
                + ("sharded (fsdp)" if "fsdp" in saved.optimizer else "unsharded"),
                hint="resume with the run's own train.parallel",
            )
        try:
            self._load_optimizer(weights, saved, folder)
            self.scheduler.load_state_dict(saved.scheduler)
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"cannot restore the optimizer from {folder / STATE}: {e}",
                hint="resume with the same optimizer and trainable parameters, or start without --resume",
            ) from None
        saved.meta, saved.frozen = self.state.meta, self.state.frozen
        self.state, self._elapsed0 = saved, saved.elapsed
        self._rank_state = saved.ranks[self.rank]  # this rank's RNG streams and partial log window
        self.saved_step = saved.step

    def _load_optimizer(self, weights: dict[str, torch.Tensor], saved: TrainState, folder: Path) -> None:
        if self.fsdp:
            fsdp.load(self.model, self.optimizer, weights, saved.optimizer)
            return
        load_trainable(self.model, weights, source=folder / WEIGHTS)
        names = [g.get("param_names") for g in saved.optimizer["param_groups"]]
        if names != [g["param_names"] for g in self.optimizer.param_groups]:
            raise CheckpointError(
                f"cannot resume {folder}: its optimizer state belongs to other parameter groups",
                hint="resume with the same trainable parameters and weight decay, or start without --resume",
            )
        self.optimizer.load_state_dict(saved.optimizer)

    # ----- the run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.main, records=self.state.metrics)
        self.ddp: DDP | None = None
        if self.world > 1 and not self.fsdp:  # frozen parameters need no grad: DDP neither reduces nor expects them
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids, find_unused_parameters=False)
        self.train_model: nn.Module = self.ddp if self.ddp is not None else self.model
        if self.cfg.compile:
            self.train_model = cast(nn.Module, torch.compile(self.train_model))
        self.reporter.start(self.total, self.state.step)
        self._t0 = time.perf_counter()
        try:
            self._run()
        except KeyboardInterrupt:
            raise self._interrupted(last_signal() or 2) from None
        except RuntimeError as e:
            if self.world > 1 and _peer_failed(e):
                raise DistributedError(
                    f"rank {self.rank} stopped: another process of this run failed or vanished "
                    f"({str(e).strip().splitlines()[0][:200]})",
                    hint="the failing rank's own error is printed above (torchrun prefixes each line with its rank)",
                ) from None
            raise
        finally:
            self.reporter.close()
            self.metrics.close()
        return self._finish()

    def _run(self) -> None:
        if self._rank_state is not None:
            self.window.sums.copy_(torch.tensor(self._rank_state["window"], dtype=torch.float64))
            set_rng_state(self._rank_state["rng"])  # last, so nothing above draws from the restored streams
        while self.state.step < self.total:
            self._epoch()
        if self.total == 0 and self.evals:
            self._evaluate()  # epochs=0 without max_steps: just score the model as built

    def _epoch(self) -> None:
        """Train until the epoch ends or the run reaches its last step."""
        epoch, skip = self.state.sampler_position()
        self.sampler.set_epoch(epoch, skip=skip)
        self._train_mode()
        self.window.resume()
        accum = self.state.grad_accum
        for micro, batch in enumerate(self.train_loader, start=1):
            self._micro_step(batch, sync=micro % accum == 0)
            if micro % accum:
                continue
            lr = self._optimizer_step()
            if self._after_step(lr):
                return

    def _train_mode(self) -> None:
        self.train_model.train()
        if not self.cfg.bn_train:
            freeze_batchnorm(self.model)

    def _micro_step(self, batch: Any, sync: bool) -> None:
        x, y = _to_device(batch, self.device, self.channels_last, self.input_norm)
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with _autocast(self.device, self.cfg.amp):
                logits = self.train_model(x)
            try:
                loss = self.criterion(logits.float(), y)
            except (IndexError, RuntimeError):
                if (bad := _label_error(logits, y)) is not None:
                    raise bad from None
                raise
            (loss / self.state.grad_accum).backward()
        self.window.add(loss, logits, y)

    def _optimizer_step(self) -> float:
        if self.cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.clip_grad)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _after_step(self, lr: float) -> bool:
        """Log, evaluate, checkpoint and honour a stop request; True when the epoch loop should end."""
        st, cfg = self.state, self.cfg
        st.step += 1
        self._steps_here += 1
        if self._steps_here <= WARMUP_STEPS:
            self.warmup_s += self.window.untime()
        epoch_end, last = st.step % st.steps_per_epoch == 0, st.step == self.total
        if st.step % cfg.log_every == 0 or last or epoch_end:
            self._check_finite(lr)
            self._log(lr)
        self.reporter.advance(st.step)
        self.window.pause()
        eval_due = bool(self.evals) and (
            epoch_end or last or (cfg.eval_every is not None and st.step % cfg.eval_every == 0)
        )
        improved = self._evaluate() if eval_due else False
        tags = ["latest"] if epoch_end or last or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0) else []
        if improved and cfg.keep_best:
            tags.append("best")
        stop = self._stop_signal(st.step % cfg.log_every == 0 or epoch_end or last)
        if stop:
            stop_acknowledged()  # at a boundary: the checkpoint below may take its time
        if stop and "latest" not in tags:
            tags.append("latest")
        if tags:
            self._check_finite(lr)  # never a checkpoint of weights a NaN loss has reached
            self.checkpoint(tags)
        if stop:
            raise self._interrupted(stop)
        if eval_due or tags:
            self._train_mode()
        self.window.resume()  # evaluation and checkpoint time are not training throughput
        return epoch_end or st.step >= self.total

    def _check_finite(self, lr: float) -> None:
        """Stop when a loss since the last log was NaN or infinite: the weights are garbage from there on, and
        a run that saved them and exited 0 would look like a result (one sync, at log and checkpoint steps)."""
        loss_sum = float(self.window.sums[0].item())
        if math.isfinite(loss_sum):
            return
        saved = self.saved_step
        kept = f"the last checkpoint (step {saved}) is kept" if saved is not None else "no checkpoint was written"
        clip = (
            f"lower train.clip_grad (now {self.cfg.clip_grad:g})" if self.cfg.clip_grad else "set train.clip_grad: 1.0"
        )
        raise TrainingDiverged(
            f"training diverged: the loss became {loss_sum} by step {self.state.step} (lr {lr:g}); stopped, {kept}",
            hint=f"start again with a lower train.lr (now {self.cfg.lr:g}), or {clip}",
        )

    def _log(self, lr: float) -> None:
        st = self.state
        mean_loss, acc, _, timed, secs = self.window.collect()
        st.images += timed
        st.train_time += secs
        st.last_loss = mean_loss
        record = {
            "step": st.step,
            "epoch": round(st.step / st.steps_per_epoch, 4),
            "loss": mean_loss,
            "lr": lr,
            "images_per_s": timed / max(secs, 1e-9) if timed else None,  # None: a window of warm-up only
            "time": self._elapsed(),
        }
        self.metrics.write(record)
        self.reporter.log({**record, "train_acc": acc, "total": self.total})
        self.window.reset()

    def _evaluate(self) -> bool:
        """Score every evaluation split; True when the best split improved."""
        st, improved = self.state, False
        for split, loader in self.evals.items():
            res = evaluate(
                self.model,
                loader,
                self.device,
                amp=self.cfg.amp,
                channels_last=self.channels_last,
                lockstep=self.fsdp,
                input_norm=self.input_norm,
            )
            epoch = round(st.step / st.steps_per_epoch, 4)
            record = {"step": st.step, "epoch": epoch, "split": split, "acc": res["acc"], "loss": res["loss"]}
            self.metrics.write(record)
            self.reporter.log({**record, "total": self.total})
            if split == self.best_split and (st.best is None or res["acc"] > st.best["acc"]):
                st.best = {"split": split, "acc": res["acc"], "step": st.step}
                improved = True
        return improved

    def checkpoint(self, tags: list[str]) -> None:
        """Write the trainable tensors and the state at this step (rank 0), every rank's RNG included."""
        ranks = du.all_gather_object({"rng": rng_state(), "window": self.window.sums.tolist()})
        weights = fsdp.full(trainable_state(self.model)) if self.fsdp or self.main else {}  # fsdp: a collective
        optim = fsdp.optimizer_state(self.model, self.optimizer) if self.fsdp else None
        du.barrier()
        if self.main:
            st = self.state
            st.metrics, st.elapsed, st.ranks = self.metrics.records, self._elapsed(), ranks
            st.optimizer, st.scheduler = optim or self.optimizer.state_dict(), self.scheduler.state_dict()
            save_checkpoint(self.ckpt_dir, step=st.step, weights=weights, state=st.to_dict(), tags=tags)
        du.barrier()
        self.saved_step = self.state.step

    # ----- stopping and finishing -------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self._elapsed0 + (time.perf_counter() - self._t0)

    def _stop_signal(self, collective_point: bool) -> int | None:
        """The stop request, agreed by all ranks (checked every step alone, at log/epoch steps under DDP)."""
        local = stop_requested()
        if self.world == 1:
            return local
        if not collective_point:
            return None
        flag = du.all_reduce_sum(torch.tensor([float(local or 0)], device=self.device))
        return (local or 15) if float(flag.item()) > 0 else None

    def _interrupted(self, signum: int) -> TrainingInterrupted:
        st, saved = self.state, self.saved_step
        where = f"interrupted at step {st.step} of {self.total}"
        if saved == st.step:
            msg = f"{where}; saved a checkpoint there ({self.ckpt_dir / f'step-{st.step:08d}'})"
        elif saved is not None:
            msg = f"{where}; the last checkpoint is step {saved}"
        else:
            msg = f"{where}; no checkpoint was written yet"
        hint = (
            f"resume with `utune apply SPEC --train --out {self.out_dir} --resume`"
            if saved is not None
            else "start the run again"
        )
        return TrainingInterrupted(
            msg, hint, signal_number=signum, out_dir=str(self.out_dir), step=st.step, checkpoint_step=saved
        )

    def _finish(self) -> dict[str, Any]:
        st = self.state
        final = {r["split"]: r["acc"] for r in self.metrics.records if "split" in r and r["step"] == st.step}
        summary: dict[str, Any] = {
            "step": st.step,
            "epoch": round(st.step / st.steps_per_epoch, 4),
            "train_loss": st.last_loss,
            "best_val_acc": st.best["acc"] if st.best else None,
            "best_step": st.best["step"] if st.best else None,
            "final_val_acc": final.get(self.best_split) if self.best_split else None,
            "time_s": round(self._elapsed(), 3),
            "images_per_s": st.images / st.train_time if st.train_time > 0 and st.images else None,
            # images_per_s leaves out each process's first warm-up steps (compilation, CUDA start-up)
            "warmup_steps": min(WARMUP_STEPS, self._steps_here),
            "warmup_s": round(self.warmup_s, 3),
            "trainable_params": sum(p.numel() for p in self.trainable),
            "out_dir": str(self.out_dir),
        }
        summary.update({f"final_{s}_acc": a for s, a in final.items() if s != self.best_split})
        if st.meta is not None:
            summary["meta"] = st.meta
        if self.main:
            write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n", what="run summary")
        return summary


def fit(
    model: nn.Module,
    train_cfg: TrainConfig,
    loaders: Mapping[str, DataLoader],
    out_dir: Path,
    *,
    resume: bool = False,
    run_meta: dict | None = None,
    reporter: Reporter | None = None,
    input_norm: Preprocess | None = None,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters; write metrics and checkpoints under ``out_dir``.

    Returns the run summary (also ``out_dir/summary.json``); see :class:`Trainer` (``input_norm`` too).
    """
    out_dir = Path(out_dir)
    if not resume and has_checkpoint(out_dir / "checkpoints"):
        raise CheckpointError(
            f"{out_dir} already holds a run's checkpoints",
            hint="pass --resume to continue it, or choose another output directory",
        )
    with _private_rng():
        trainer = Trainer(
            model, train_cfg, loaders, out_dir, run_meta=run_meta, reporter=reporter, input_norm=input_norm
        )
        if resume:
            trainer.restore()
        return trainer.fit()


@contextlib.contextmanager
def _private_rng() -> Iterator[None]:
    """Training seeds and draws from the global RNGs (dropout, augmentation in the main process); the
    caller's streams (torch CPU and CUDA, numpy, random) are put back afterwards."""
    saved = (random.getstate(), np.random.get_state())
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])

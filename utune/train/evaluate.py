"""Scoring a model on a loader (``evaluate``: accuracy, loss, top-5, per class and the confusion matrix where
asked), and the device and autocast helpers the training loop shares with it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from utune.errors import DataError
from utune.train import distributed as du


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    # bf16 needs no loss scaling; on CPU autocast would only slow the tiny matmuls down.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


Preprocess = Callable[[torch.Tensor], torch.Tensor]


def _to_device(
    batch: Any, device: torch.device, channels_last: bool, input_norm: Preprocess | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels on ``device``; uint8 images (``data`` built with ``device_normalize``) are
    normalised there by ``input_norm``: a quarter of the bytes of float pixels cross to the device."""
    try:
        x, y = batch[0], batch[1]
    except (TypeError, IndexError, KeyError):
        raise DataError(f"a data loader batch must be (images, labels); got {type(batch).__name__}") from None
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        if input_norm is None:
            raise DataError(
                "the data loader yields uint8 images but the training loop was given no input_norm",
                hint="pass input_norm=utune.data.InputNorm.from_data_config(data_config) (or build the datasets "
                "without device_normalize)",
            )
        x = input_norm(x)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True).long()


def _label_error(logits: torch.Tensor, y: torch.Tensor) -> DataError | None:
    n = logits.shape[-1]
    if y.numel() and (int(y.max()) >= n or int(y.min()) < 0):
        return DataError(
            f"a label ({int(y.max()) if int(y.max()) >= n else int(y.min())}) is outside the model's {n} outputs",
            hint="set model.num_classes to the dataset's class count (or leave it out: utune then takes it "
            "from the dataset)",
        )
    return None


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    *,
    amp: bool = True,
    channels_last: bool = False,
    lockstep: bool = False,
    input_norm: Preprocess | None = None,
    classes: int | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy and mean cross-entropy over ``loader``, summed over all DDP ranks.
    ``input_norm`` normalises uint8 batches on the device (:class:`utune.data.InputNorm`). ``classes``: also
    ``top5`` (top-k accuracy, k = min(5, classes)) and ``confusion`` (rows: true class, columns: predicted).

    Under DDP each rank must see a disjoint shard with no padding (``fit`` arranges that); the counts,
    not per-rank means, are all-reduced, so the result is exact for any shard sizes. ``lockstep`` (FSDP,
    where every forward is a collective): a rank with fewer batches runs uncounted forwards until all match.
    """
    device = torch.device(device)
    input_norm = input_norm if input_norm is not None else getattr(loader, "input_norm", None)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct, loss sum, count, top-k correct
    confusion = torch.zeros(classes or 0, classes or 0, dtype=torch.int64, device=device)
    batches, last = 0, None
    try:
        with torch.no_grad(), _autocast(device, amp):
            for batch in loader:
                x, y = _to_device(batch, device, channels_last and device.type == "cuda", input_norm)
                logits = model(x).float()
                if (bad := _label_error(logits, y)) is not None:
                    raise bad
                pred = logits.argmax(dim=-1)
                totals[0] += (pred == y).sum()
                totals[1] += F.cross_entropy(logits, y, reduction="sum")
                totals[2] += y.numel()
                if classes:
                    k = min(5, logits.shape[-1])
                    totals[3] += (logits.topk(k, dim=-1).indices == y[:, None]).any(dim=-1).sum()
                    confusion += torch.bincount(y * classes + pred, minlength=classes * classes).view(classes, -1)
                batches, last = batches + 1, x
            if lockstep:
                _catch_up(model, batches, last, device)
    finally:
        for m, mode in modes.items():
            m.training = mode
    du.all_reduce_sum(totals)
    correct, loss_sum, n, top_k = totals.tolist()
    if n == 0:
        raise DataError("the evaluation split has no images")
    result: dict[str, Any] = {"acc": correct / n, "loss": loss_sum / n, "n": int(n)}
    if classes:
        du.all_reduce_sum(confusion)
        result.update(top5=top_k / n, confusion=confusion.cpu().tolist())
    return result


_PEER_FAILURE = ("closed by peer", "connection reset", "remote worker", "broken pipe", "nccl", "timed out")


def _peer_failed(e: RuntimeError) -> bool:
    """A collective failed because another rank crashed or left (gloo/NCCL's own words)."""
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(word in text for word in _PEER_FAILURE)


def _catch_up(model: nn.Module, batches: int, last: torch.Tensor | None, device: torch.device) -> None:
    """Forwards on a dummy batch until this rank has run as many as the busiest one (FSDP collectives)."""
    most = int(du.all_reduce_max(torch.tensor([batches], device=device)).item())
    shape = du.broadcast_object(tuple(last.shape[1:]) if last is not None else None)  # rank 0 has the most
    if most > batches and shape is not None:
        dummy = torch.zeros(1, *shape, device=device)
        for _ in range(most - batches):
            model(dummy)

"""The ``data:`` and ``train:`` sections of a spec."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from utune._schema import Section


class DataConfig(Section):
    # cifar100 | cifar10 | cub | nabirds | flowers102 | stanford_cars | stanford_dogs
    # | vtab-<task> | imagefolder | digits | fashion-mnist
    dataset: str | None = None
    root: str | None = None  # where the data lives; default: ~/.cache/utune/data/<dataset>
    img_size: int | None = Field(default=None, gt=0)  # default: the model's own input size
    num_workers: int = Field(default=2, ge=0)
    # training augmentation (timm's random-resized crop, flip, colour jitter); false: the evaluation
    # transform for every split, better for tiny images (8x8 digits) that a crop destroys
    augment: bool = True


class TrainConfig(Section):
    epochs: int = Field(default=10, ge=0)
    max_steps: int | None = Field(default=None, gt=0)  # stops early when reached
    batch_size: int = Field(default=64, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0)  # SGD only
    warmup_epochs: float = Field(default=1.0, ge=0)
    min_lr: float = Field(default=1e-6, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    clip_grad: float | None = Field(default=None, gt=0)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # CUDA only
    compile: bool = False
    checkpoint_every: int | None = Field(default=None, gt=0)  # steps; also at every epoch end
    eval_every: int | None = Field(default=None, gt=0)  # steps; also at every epoch end
    log_every: int = Field(default=10, gt=0)
    # where else the run logs, beside metrics.jsonl: tensorboard = event files in RUN/tensorboard/ (loss, lr,
    # accuracy, images/s, the spec as text; needs the tensorboard package: pip install 'utune[tensorboard]')
    log: list[Literal["tensorboard"]] = Field(default_factory=list)
    keep_best: bool = True  # also keep the checkpoint with the best val accuracy
    bn_train: bool = False  # update BatchNorm running stats of the frozen backbone
    device: str | None = None  # default: cuda when available, else cpu
    # under torchrun: ddp = every process holds the whole model; fsdp = torch's FSDP2 shards the parameters,
    # gradients and optimizer state over the processes (backbones that do not fit one GPU)
    parallel: Literal["ddp", "fsdp"] = "ddp"

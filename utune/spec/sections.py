"""The ``data:`` and ``train:`` sections of a spec."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from utune._schema import Section

# none: the evaluation transform for training too; timm: timm's random-resized crop, flip and colour jitter
# (for natural images of 100+ px); crop: pad by 1/8 of the size and crop back at random (CIFAR's recipe,
# suited to small images); crop-flip: crop plus a horizontal flip (not for glyphs, nor for the rotation task)
AUGMENT_MODES = ("none", "timm", "crop", "crop-flip")
Augment = Annotated[
    Literal["none", "timm", "crop", "crop-flip"],
    WithJsonSchema({"anyOf": [{"enum": list(AUGMENT_MODES)}, {"type": "boolean"}], "default": "timm"}),
]


class DataConfig(Section):
    # cifar100 | cifar10 | cub | nabirds | flowers102 | stanford_cars | stanford_dogs
    # | vtab-<task> | imagefolder | csv | digits | fashion-mnist  (your own images: imagefolder or csv, docs/data.md)
    dataset: str | None = None
    root: str | None = None  # where the data lives (csv: the .csv file); default: ~/.cache/utune/data/<dataset>
    img_size: int | None = Field(default=None, gt=0)  # default: the model's own input size
    # loader processes per training process; null: one per CPU core this process may use, less one for the
    # training loop, at most 16 (utune.data.default_workers). ViT-B's 224 px training transform costs ~1.4 ms
    # of CPU per image (bench/results/data_*.md), so a worker feeds ~700 img/s: 2 cap a run far below one GPU
    num_workers: int | None = Field(default=None, ge=0, description="loader processes; null: from the CPU count")
    # training augmentation, one of AUGMENT_MODES above; true = timm, false = none (the spec format before 0.2)
    augment: Augment = Field(default="timm", description="training augmentation: none | timm | crop | crop-flip")
    # keep only these classes of the dataset, relabelled 0..len-1 in the order given (held-out-class tasks)
    classes: list[int] | None = Field(
        default=None, min_length=2, description="keep these classes only, relabelled 0..len-1 in this order"
    )
    # classify: the dataset's labels; rotation: each image is turned by k*90 degrees (k fixed per image by
    # split_seed) and the label is k (4 classes): a structured task made from real images
    task: Literal["classify", "rotation"] = Field(
        default="classify", description="classify: the labels; rotation: predict the k*90 degree turn of each image"
    )
    # a class-stratified random subset of this many training images (VTAB-1k: 1000), drawn with split_seed
    train_size: int | None = Field(default=None, gt=0, description="a class-stratified subset of the training split")
    # carve a validation split from the training data: a count, or a fraction in (0, 1); `val` is then this
    # part (never the dataset's own val or test) and `train` the rest. VTAB-1k: train_size 1000, val_size 200
    val_size: int | float | None = Field(
        default=None, gt=0, description="carve val from the training data: a count, or a fraction in (0, 1)"
    )
    # carve a test split from the training data (a count, or a fraction in (0, 1)), stratified, before
    # train_size and val_size: for a flat folder or a CSV file that has no test split of its own
    test_size: int | float | None = Field(
        default=None, gt=0, description="carve test from the training data: a count, or a fraction in (0, 1)"
    )
    # false: stop before training with the names of unreadable image files (truncated, empty, over PIL's pixel
    # limit); true: leave them out with one warning giving their count and the first names
    skip_bad_images: bool = Field(default=False, description="leave unreadable image files out (with a warning)")
    split_seed: int = Field(
        default=0, ge=0, lt=2**63, description="seed of train_size, val_size and the rotations"
    )  # draws train_size, val_size and the rotations; not the training seed

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_bool(cls, value: Any) -> Any:
        if value is True:
            return "timm"
        if value is False:
            return "none"
        return value

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None:
            if any(c < 0 for c in classes):
                raise ValueError(f"class indices must be >= 0, got {classes}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes must be distinct, got {classes}")
        return classes

    @field_validator("val_size", "test_size")
    @classmethod
    def _fraction_or_count(cls, value: int | float | None, info: ValidationInfo) -> int | float | None:
        if isinstance(value, float) and not value.is_integer() and not 0 < value < 1:
            raise ValueError(f"{info.field_name} is a count (an integer) or a fraction in (0, 1), got {value}")
        return int(value) if isinstance(value, float) and value.is_integer() and value >= 1 else value

    @model_validator(mode="after")
    def _val_inside_train(self) -> DataConfig:
        if isinstance(self.val_size, int) and self.train_size is not None and self.val_size >= self.train_size:
            raise ValueError(
                f"val_size ({self.val_size}) must be smaller than train_size ({self.train_size}): "
                "the validation split is carved from the training subset"
            )
        return self


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
    seed: int = Field(default=0, ge=0, lt=2**63)  # torch's generators take 64 bits; the loop mixes in the epoch
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # CUDA only
    compile: bool = False
    # host memory: tensors of 1 MiB or more go back to the OS when freed (glibc's mmap threshold fixed at
    # 1 MiB; utune.train.memory): a lower peak on CPU training (bypass -25 %, full -7 %), steps a few % slower
    release_freed_memory: bool = False
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

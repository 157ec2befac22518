"""The training loop on real data (scikit-learn's digits, upsampled to 3x32x32) with tiny timm models.

The helpers at the top are shared with test_checkpoint.py and test_ddp.py (and their subprocess scripts).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from utune.spec.sections import TrainConfig
from utune.train.loop import evaluate, fit, freeze_batchnorm
from utune.train.optim import param_groups

N_TRAIN = 1500  # of 1797 digits; the rest is the validation split


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(d.target, dtype=torch.long)


class Digits(Dataset):
    """Digits with a random augmentation drawn from torch *and* python RNGs, like real transforms."""

    def __init__(self, split: str, augment: bool = False) -> None:
        x, y = _digits()
        sl = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)
        self.x, self.y, self.augment = x[sl], y[sl], augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        if self.augment:
            img = img + 0.05 * torch.randn_like(img)
            shift = random.randint(-1, 1)
            img = torch.roll(img, shifts=shift, dims=2)
        return img, self.y[i]


def digits_loaders(batch_size: int = 16, augment: bool = True, num_workers: int = 0) -> dict[str, DataLoader]:
    return {
        "train": DataLoader(Digits("train", augment), batch_size=batch_size, shuffle=True, num_workers=num_workers),
        "val": DataLoader(Digits("val"), batch_size=64, num_workers=0),
    }


def tiny_vit(seed: int = 0, drop_rate: float = 0.1) -> nn.Module:
    """test_vit at 32 px with everything frozen except the head and the norms (a PETL-like setup)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32, drop_rate=drop_rate)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.") or ".norm" in name or name.startswith("norm.")
    return model


def tiny_resnet(seed: int = 0) -> nn.Module:
    """test_resnet with a frozen backbone (BatchNorm everywhere) and a trainable classifier."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("fc.")
    return model


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=0, max_steps=40, batch_size=16, lr=1e-2, warmup_epochs=0.05, weight_decay=0.05,
                log_every=5, seed=0, device="cpu")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(model: nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


# ---- tests ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # These models are far too small to gain from intra-op threads, and on a busy machine spinning
    # OpenMP threads slow them down several-fold.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fit_learns_logs_and_leaves_frozen_weights_alone(tmp_path: Path) -> None:
    model = tiny_vit()
    frozen_before = snapshot(model, trainable=False)
    trainable_before = snapshot(model, trainable=True)
    summary = fit(model, train_cfg(max_steps=50, eval_every=25), digits_loaders(), tmp_path)

    lines = read_jsonl(tmp_path / "metrics.jsonl")
    train_lines = [r for r in lines if "split" not in r]
    eval_lines = [r for r in lines if "split" in r]
    assert [r["step"] for r in train_lines] == list(range(5, 51, 5))
    for r in train_lines:
        assert set(r) == {"step", "epoch", "loss", "lr", "images_per_s", "time"}
    for r in eval_lines:
        assert set(r) == {"step", "epoch", "split", "acc", "loss"}
    assert [r["step"] for r in eval_lines] == [25, 50]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 0.2
    assert summary["final_val_acc"] > 0.3  # chance is 0.1
    assert summary["step"] == 50 and summary["best_val_acc"] >= summary["final_val_acc"]
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 50

    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            assert torch.equal(p.detach(), frozen_before[name]), name
    assert any(not torch.equal(p, trainable_before[n]) for n, p in snapshot(model, trainable=True).items())

    # The checkpoint holds exactly the trainable tensors, and optimizer state for exactly those.
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest.txt").read_text().strip()
    assert set(load_file(ckpt / "model.safetensors")) == set(trainable_before)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    opt = state["optimizer"]
    names = [n for g in opt["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(trainable_before)
    assert len(opt["state"]) == len(trainable_before)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for g in opt["param_groups"]:
        if any(len(shapes[n]) <= 1 for n in g["param_names"]):
            assert g["weight_decay"] == 0.0


def test_param_groups_exempt_vectors_from_weight_decay() -> None:
    model = tiny_vit()
    for name, p in model.named_parameters():
        p.requires_grad = p.requires_grad or name.startswith("blocks.1.")
    groups = param_groups(model, weight_decay=0.1)
    by_name = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    params = dict(model.named_parameters())
    assert set(by_name) == {n for n, p in params.items() if p.requires_grad}
    for name, wd in by_name.items():
        assert wd == (0.0 if params[name].ndim <= 1 else 0.1), name
    assert by_name["blocks.1.mlp.fc1.weight"] == 0.1 and by_name["blocks.1.mlp.fc1.bias"] == 0.0


def test_frozen_batchnorm_statistics_stay_put(tmp_path: Path) -> None:
    model = tiny_resnet()
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert bn_state
    fit(model, train_cfg(max_steps=4, log_every=2), {"train": digits_loaders()["train"]}, tmp_path / "a")
    after = model.state_dict()
    for k, v in bn_state.items():
        assert torch.equal(after[k], v), k

    # The same run with bn_train updates them: the check above is sensitive.
    model = tiny_resnet()
    fit(model, train_cfg(max_steps=4, bn_train=True), {"train": digits_loaders()["train"]}, tmp_path / "b")
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in bn_state.items())


def test_freeze_batchnorm_keeps_trainable_norms_in_train_mode() -> None:
    model = tiny_resnet()
    model.bn1.weight.requires_grad = True
    model.train()
    frozen = freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert frozen == len(bns) - 1
    assert model.bn1.training and all(not m.training for m in bns if m is not model.bn1)


def test_grad_accumulation_matches_a_big_batch(tmp_path: Path) -> None:
    results = []
    for i, (bs, accum) in enumerate([(16, 1), (8, 2)]):
        model = tiny_vit(drop_rate=0.0)
        cfg = train_cfg(max_steps=1, batch_size=bs, grad_accum=accum, optimizer="sgd", momentum=0.0,
                        weight_decay=0.0, warmup_epochs=0, log_every=1)  # fmt: skip
        fit(model, cfg, {"train": digits_loaders(batch_size=bs)["train"]}, tmp_path / str(i))
        results.append((snapshot(model, trainable=True), read_jsonl(tmp_path / str(i) / "metrics.jsonl")[0]["loss"]))
    (w_big, loss_big), (w_acc, loss_acc) = results
    assert loss_big == pytest.approx(loss_acc, abs=1e-6)
    for name in w_big:
        assert torch.allclose(w_big[name], w_acc[name], atol=1e-6), name


def test_clip_grad_bounds_the_update(tmp_path: Path) -> None:
    model = tiny_vit(drop_rate=0.0)
    before = snapshot(model, trainable=True)
    cfg = train_cfg(max_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_epochs=0, lr=0.5,
                    clip_grad=1e-3, label_smoothing=0.1)  # fmt: skip
    fit(model, cfg, {"train": digits_loaders()["train"]}, tmp_path)
    delta = torch.cat([(p - before[n]).flatten() for n, p in snapshot(model, trainable=True).items()])
    assert delta.norm().item() == pytest.approx(0.5 * 1e-3, rel=1e-3)  # lr x clip: the raw grad is larger


def test_max_steps_and_epoch_boundaries(tmp_path: Path) -> None:
    loaders = {"train": digits_loaders(batch_size=64)["train"], "val": digits_loaders()["val"]}
    s = fit(tiny_vit(), train_cfg(epochs=0, max_steps=7, batch_size=64, log_every=3), loaders, tmp_path / "a")
    assert s["step"] == 7
    assert [r["step"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "split" not in r] == [3, 6, 7]

    # 1500 // 64 = 23 steps per epoch; max_steps beyond one epoch does not extend epochs=1.
    s = fit(tiny_vit(), train_cfg(epochs=1, max_steps=100, batch_size=64, log_every=50), loaders, tmp_path / "b")
    assert s["step"] == 23 and s["epoch"] == 1.0
    assert (tmp_path / "b" / "checkpoints" / "step-00000023" / "model.safetensors").is_file()


def test_evaluate_counts_every_sample() -> None:
    model = tiny_vit()
    res = evaluate(model, digits_loaders()["val"], "cpu")
    assert res["n"] == 1797 - N_TRAIN and 0.0 <= res["acc"] <= 1.0 and res["loss"] > 0
    assert model.training  # the caller's mode is restored


def test_compile_trains_like_eager_and_throughput_leaves_out_the_compile_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.compile on test_vit at 32 px. Inductor's C++ codegen takes ~46 s here from a cold cache, so the
    test compiles with the aot_eager backend (Dynamo capture + AOT autograd, the same graphs, no codegen)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        cfg = train_cfg(max_steps=4, log_every=1, compile=compiled)
        summary = fit(tiny_vit(drop_rate=0.0), cfg, digits_loaders(augment=False), out)
        runs[compiled] = summary, [r for r in read_jsonl(out / "metrics.jsonl") if "split" not in r]
    (_, eager_lines), (comp, comp_lines) = runs[False], runs[True]
    assert [r["loss"] for r in comp_lines] == pytest.approx([r["loss"] for r in eager_lines], abs=1e-4)
    for summary, lines in runs.values():
        assert lines[0]["images_per_s"] is None  # the warm-up step alone: nothing timed
        assert all(r["images_per_s"] > 0 for r in lines[1:])
        assert summary["warmup_steps"] == 1 and summary["warmup_s"] > 0
    # compiling takes seconds, the 3 timed steps milliseconds: the wall clock of the run would be far lower
    assert comp["images_per_s"] > 4 * 16 / comp["time_s"]


def test_uint8_batches_normalised_on_the_device_train_like_float_batches(tmp_path: Path) -> None:
    """data built with device_normalize (uint8 pixels) + InputNorm in the loop == the CPU-normalised path."""
    from utune.data import InputNorm, build_datasets
    from utune.spec.sections import DataConfig

    data_config = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    cfg = DataConfig(dataset="digits", augment="crop-flip")
    curves = []
    for on_device in (False, True):
        ds = build_datasets(cfg, data_config, splits=("train", "val"), device_normalize=on_device)
        loaders = {name: DataLoader(d, batch_size=16, shuffle=name == "train") for name, d in ds.items()}
        norm = InputNorm.from_data_config(data_config) if on_device else None
        summary = fit(
            tiny_vit(), train_cfg(max_steps=8, log_every=1), loaders, tmp_path / str(on_device), input_norm=norm
        )
        lines = read_jsonl(tmp_path / str(on_device) / "metrics.jsonl")
        curves.append(([r["loss"] for r in lines if "split" not in r], summary["final_val_acc"]))
    (float_loss, float_acc), (uint8_loss, uint8_acc) = curves
    assert uint8_loss == pytest.approx(float_loss, abs=1e-5) and uint8_acc == float_acc


def test_uint8_batches_without_input_norm_are_an_error(tmp_path: Path) -> None:
    from utune.errors import DataError

    class Pixels(Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(3, 32, 32, dtype=torch.uint8), i % 10

    with pytest.raises(DataError, match="uint8 images") as err:
        fit(tiny_vit(), train_cfg(max_steps=1), {"train": DataLoader(Pixels(), batch_size=16)}, tmp_path)
    assert "InputNorm" in (err.value.hint or "")

"""Checkpoints: atomic writes, damage detection, exact resume after SIGKILL, run-level train/eval."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from utune import runs as run_mod
from utune.errors import CheckpointError
from utune.spec.sections import DataConfig, TrainConfig
from utune.train import checkpoint as ck
from utune.train.loop import fit

sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import digits_loaders, one_thread, read_jsonl, snapshot, tiny_vit, train_cfg  # noqa: E402,F401

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
# one_thread (autouse, imported above): one intra-op thread here and in the subprocess runs, so the
# reference and the killed run use the same float reduction order and do not oversubscribe the CPUs.


def _save(ckpt_dir: Path, step: int, value: float, tags: tuple[str, ...] = ("latest",)) -> Path:
    weights = {"head.weight": torch.full((3, 4), value), "head.bias": torch.zeros(3)}
    return ck.save_checkpoint(ckpt_dir, step=step, weights=weights, state={"step": step, "x": value}, tags=tags)


def test_checkpoint_layout_and_pruning(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0, ("latest", "best"))
    _save(d, 2, 2.0)
    _save(d, 3, 3.0)
    assert sorted(p.name for p in d.iterdir()) == ["best.txt", "latest.txt", "step-00000001", "step-00000003"]
    weights, state, folder = ck.load_checkpoint(tmp_path)
    assert folder.name == "step-00000003" and state["x"] == 3.0 and weights["head.weight"][0, 0] == 3.0
    assert ck.load_checkpoint(tmp_path, "best")[1]["step"] == 1
    # state.pt is plain data: torch's safe loader reads it.
    assert torch.load(folder / "state.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("crash_in", ["_publish", "_write_pointer"])
def test_crash_before_the_switch_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_in: str
) -> None:
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(ck, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        _save(d, 2, 2.0)
    monkeypatch.undo()
    # An interrupted write leaves no temp folder; only a folder completely written before the pointer
    # switch (an interrupt in _write_pointer) remains, unreferenced...
    leftovers = [p for p in d.iterdir() if p.name != "step-00000001" and p.name not in ("latest.txt",)]
    if crash_in == "_publish":
        assert leftovers == []
    else:
        assert [p.name for p in leftovers] == ["step-00000002"] and (leftovers[0] / "state.pt").is_file()
    # ...and the pointer still names the old one, which loads.
    weights, state, folder = ck.load_checkpoint(d)
    assert folder.name == "step-00000001" and state["x"] == 1.0
    # A kill -9 cannot clean up: its debris (a temp folder, a pointer's temp file) goes at the next save.
    (d / ".tmp-killed").mkdir()
    (d / ".tmp-killed" / "state.pt").write_bytes(b"partial")
    (d / ".latest.txt.tmp-999").write_text("step-")
    _save(d, 3, 3.0)
    assert sorted(p.name for p in d.iterdir()) == ["latest.txt", "step-00000003"]


def test_sigkill_during_writes_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    # A real kill -9 while a writer saves large checkpoints back to back.
    script = tmp_path / "writer.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from utune.train.checkpoint import save_checkpoint
        big = torch.randn(4_000_000)
        for step in range(1, 10_000):
            save_checkpoint(Path({str(tmp_path / "ck")!r}), step=step, weights={{"w": big + step}},
                            state={{"step": step, "pad": big}})
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ck" / "latest.txt").exists() or not any((tmp_path / "ck").glob(".tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # a temp folder exists: the kill lands mid-write
    finally:
        proc.wait()
    weights, state, _ = ck.load_checkpoint(tmp_path / "ck")
    assert weights["w"][0] == pytest.approx(state["pad"][0].item() + state["step"])


def test_damaged_checkpoints_are_reported(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    folder = _save(d, 1, 1.0)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated") as e:
        ck.load_checkpoint(d)
    assert "without --resume" in str(e.value)

    folder = _save(d, 2, 2.0)
    (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.pt is corrupt or truncated"):
        ck.load_checkpoint(d)

    (d / "latest.txt").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        ck.load_checkpoint(d)
    with pytest.raises(CheckpointError, match="no 'latest' checkpoint"):
        ck.load_checkpoint(tmp_path / "nowhere")


def test_strict_loading_of_trainable_tensors(tmp_path: Path) -> None:
    model = tiny_vit()
    state = ck.trainable_state(model)
    ck.load_trainable(model, state, source="x")
    with pytest.raises(CheckpointError, match="missing 1"):
        ck.load_trainable(model, {k: v for k, v in state.items() if k != "head.bias"}, source="x")
    with pytest.raises(CheckpointError, match="unexpected 1"):
        ck.load_trainable(model, {**state, "extra": torch.zeros(1)}, source="x")
    with pytest.raises(CheckpointError, match="has shape"):
        ck.load_trainable(model, {**state, "head.bias": torch.zeros(7)}, source="x")


_RUN_B = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
from pathlib import Path
from torch.utils.data import DataLoader
from test_train_loop import Digits, digits_loaders, tiny_vit, train_cfg
from utune.train.loop import fit

POINTER = Path({out!r}) / "checkpoints" / "latest.txt"

class Stalling(Digits):
    # Same data. Once the step-20 checkpoint exists, loading crawls so the run cannot finish before
    # the parent's kill lands, however busy the machine is.
    def __getitem__(self, i):
        if POINTER.exists() and POINTER.read_text().strip() >= "step-00000020":
            time.sleep(0.02)
        return super().__getitem__(i)

loaders = digits_loaders(batch_size=32)
# Two workers here, none in the reference run: the order and augmentations must not depend on it.
loaders["train"] = DataLoader(Stalling("train", augment=True), batch_size=32, num_workers=2)
fit(tiny_vit(), train_cfg(**{cfg!r}), loaders, Path({out!r}))
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # 1500 // 32 = 46 steps per epoch: the resumed part crosses an epoch boundary. Checkpoints every 10
    # steps are mostly not log boundaries (log_every=3), so a partial log window is restored too.
    cfg = dict(max_steps=60, batch_size=32, checkpoint_every=10, eval_every=20, log_every=3)
    out = tmp_path / "b"
    script = tmp_path / "run_b.py"
    script.write_text(_RUN_B.format(tests=str(TESTS_DIR), threads=1, cfg=cfg, out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**os.environ, "UTUNE_QUIET": "1"})
    try:
        ref = tiny_vit()  # the uninterrupted reference run, while the subprocess starts up
        fit(ref, train_cfg(**cfg), digits_loaders(batch_size=32), tmp_path / "a")
        pointer = out / "checkpoints" / "latest.txt"
        deadline = time.monotonic() + 120
        while not (pointer.exists() and pointer.read_text().strip() >= "step-00000020"):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    resumed_from = ck.read_state(ck.resolve_checkpoint(out) / "state.pt")["step"]
    assert 20 <= resumed_from < 60

    model = tiny_vit()
    summary = fit(model, train_cfg(**cfg), digits_loaders(batch_size=32), out, resume=True)
    assert summary["step"] == 60
    want, got = snapshot(ref, trainable=True), snapshot(model, trainable=True)
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name

    def comparable(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in read_jsonl(path)]

    a, b = comparable(tmp_path / "a" / "metrics.jsonl"), comparable(out / "metrics.jsonl")
    assert [(r["step"], r.get("split")) for r in a] == [(r["step"], r.get("split")) for r in b]
    assert any(r["step"] > resumed_from for r in b)
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, abs=1e-6)


def test_resume_refuses_a_different_setup(tmp_path: Path) -> None:
    loaders = digits_loaders()
    fit(tiny_vit(), train_cfg(max_steps=3, checkpoint_every=2), loaders, tmp_path)
    with pytest.raises(CheckpointError, match="already holds"):
        fit(tiny_vit(), train_cfg(max_steps=3), loaders, tmp_path)
    with pytest.raises(CheckpointError, match="batch_size=16"):
        fit(tiny_vit(), train_cfg(max_steps=5), digits_loaders(batch_size=8), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="frozen weights differ"):
        fit(tiny_vit(seed=1), train_cfg(max_steps=5), loaders, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no 'latest' checkpoint"):
        fit(tiny_vit(), train_cfg(max_steps=5), loaders, tmp_path / "fresh", resume=True)


# ---- run level, with stand-ins for utune.engine.build / utune.spec -----------------------------------------


@dataclass
class _Spec:
    model: Any
    data: DataConfig
    train: TrainConfig


@dataclass
class _Built:
    model: nn.Module
    spec: _Spec
    data_config: dict = field(default_factory=lambda: {"input_size": (3, 32, 32)})
    report: dict = field(default_factory=dict)

    @property
    def model_label(self) -> str:  # as utune.engine.record.Built names the model
        return str(self.spec.model.name)


def test_train_run_and_eval_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _Spec(types.SimpleNamespace(name="test_vit"), DataConfig(dataset="digits"), train_cfg(max_steps=12))
    seen_specs: list[Any] = []

    def fake_loaders(data_cfg: DataConfig, data_config: dict, tcfg: TrainConfig, splits=("train", "val"), **kw):
        return {s: digits_loaders()[s] for s in splits}

    def fake_build(path: Path, overrides=(), **kw) -> _Built:
        seen_specs.append((Path(path).read_text(), list(overrides)))
        return _Built(tiny_vit(), spec)

    monkeypatch.setattr(run_mod, "build_loaders", fake_loaders)
    fake_spec = types.SimpleNamespace(
        spec_to_yaml=lambda s: "version: 1\n", load_spec=lambda path, overrides=(), **kw: spec
    )
    monkeypatch.setitem(sys.modules, "utune.spec", fake_spec)
    monkeypatch.setitem(sys.modules, "utune.engine.build", types.SimpleNamespace(build=fake_build))

    monkeypatch.setattr(run_mod.time, "strftime", lambda fmt: "20250101-120000")
    out = run_mod.default_run_dir("specs/vit_lora.yaml", base=tmp_path / "runs")
    assert out == tmp_path / "runs" / "vit_lora-20250101-120000"
    out.mkdir(parents=True)  # the same second again: a suffix keeps runs apart
    assert run_mod.default_run_dir("vit_lora.yaml", base=tmp_path / "runs").name == "vit_lora-20250101-120000-2"
    summary = run_mod.train_run(_Built(tiny_vit(), spec), out, resume=False)
    assert (out / "spec.yaml").read_text() == "version: 1\n"
    assert summary["meta"] == {"model": "test_vit", "dataset": "digits", "processes": 1}
    assert run_mod.latest_run(tmp_path / "runs") == out

    result = run_mod.eval_run(out, None, "val")
    assert seen_specs == [("version: 1\n", [])]
    assert result["n"] == 297 and result["acc"] == pytest.approx(summary["final_val_acc"], abs=1e-9)
    run_mod.eval_run(out, "fashion-mnist", "val")
    assert seen_specs[-1][1] == ["data.dataset=fashion-mnist"]

    other_base = _Built(tiny_vit(seed=1), spec)
    monkeypatch.setitem(sys.modules, "utune.engine.build", types.SimpleNamespace(build=lambda *a, **k: other_base))
    with pytest.raises(CheckpointError, match="frozen weights differ"):
        run_mod.eval_run(out, None, "val")
    with pytest.raises(CheckpointError, match="not a utune run directory"):
        run_mod.eval_run(tmp_path, None, "val")
    with pytest.raises(CheckpointError, match="no training runs"):
        run_mod.latest_run(tmp_path / "empty")


_SPEC = """
version: 1
model: {name: test_vit, pretrained: false, num_classes: 10, img_size: 32}
trainable: [head]
data: {dataset: digits, num_workers: 0}
train: {epochs: 0, max_steps: 4, batch_size: 32, log_every: 2, device: cpu}
"""


def test_train_and_eval_run_with_the_real_builder(tmp_path: Path) -> None:
    # Integration with utune.engine.build.build and utune.data (digits ship with scikit-learn: offline).
    from utune.engine.build import build

    spec = tmp_path / "tiny.yaml"
    spec.write_text(_SPEC)
    torch.manual_seed(0)  # pretrained=false: the random base weights must be the same at eval time
    out = tmp_path / "run"
    summary = run_mod.train_run(build(spec), out, resume=False)
    assert summary["step"] == 4 and (out / "spec.yaml").is_file()
    torch.manual_seed(0)
    result = run_mod.eval_run(out, None, "val")
    assert result["acc"] == pytest.approx(summary["final_val_acc"], abs=1e-9)


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from utune.errors import StorageError

    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_save_tensors", full)
    with pytest.raises(StorageError) as e:
        _save(d, 2, 2.0)
    assert "no space left on the device" in e.value.message and "step-00000001" in e.value.message
    assert e.value.exit_code == 2 and "free some space" in (e.value.hint or "")
    assert sorted(p.name for p in d.iterdir()) == ["latest.txt", "step-00000001"]  # no .tmp-* folder
    weights, state, folder = ck.load_checkpoint(d)
    assert folder.name == "step-00000001" and state["x"] == 1.0

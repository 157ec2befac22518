"""``utune compare``: selection on a carved validation split, seeds, intervals, reuse, failures (tiny ViT, digits)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from utune.compare import Method, compare, parse_grid
from utune.compare.stats import mean_ci
from utune.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
TINY = """version: 1
model: {{name: test_vit, img_size: 32, kwargs: {{depth: 2}}}}
tuners: {tuners}
trainable: [head]
data: {{dataset: digits, augment: none, num_workers: 0, train_size: 300}}
train: {{epochs: 1, max_steps: 6, batch_size: 16, lr: 1.0e-2, log_every: 3, warmup_epochs: 0}}
"""
LORA = '[{name: lora, kind: lora, at: "blocks.*.attn.qkv", rank: 2}]'


def _specs(tmp_path: Path, broken: bool = False) -> list[Path]:
    files = {"linear": "[]", "lora": LORA}
    if broken:
        files["broken"] = '[{name: x, kind: lora, at: "blocks.*.atn.qkv"}]'  # matches nothing: fails at build
    paths = []
    for name, tuners in files.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(TINY.format(tuners=tuners))
        paths.append(path)
    return paths


def test_cli_compare_selects_on_val_runs_seeds_and_reuses(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "utune", "compare", *map(str, _specs(tmp_path, broken=True))]
    cmd += ["--dataset", "digits", "--seeds", "2", "--lr-grid", "1e-3,3e-2", "--out", str(out), "--format", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UTUNE_QUIET": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in doc["methods"]}
    assert "run 1/12" in proc.stderr and "left" in proc.stderr  # which run of how many, and the time left
    assert "every selection run failed" in rows["broken"]["error"] and "atn" in rows["broken"]["error"]
    for name in ("linear", "lora"):
        row = rows[name]
        assert row["error"] is None and len(row["acc"]) == 2 and [s["seed"] for s in row["seeds"]] == [0, 1]
        assert row["lr"] in (1e-3, 3e-2) and row["selected"] == {"train.lr": row["lr"]}
        assert [s["n_val"] for s in row["selection"]] == [60, 60]  # 20 % of the 300 training images
        assert row["n_test"] == 360 and row["n_train"] == 300  # final runs: all 300, scored on the whole test split
        t = 12.7062  # Student-t, 1 degree of freedom
        assert row["acc_ci95"] == pytest.approx(t * np.std(row["acc"], ddof=1) / math.sqrt(2), rel=1e-4)
    assert rows["linear"]["step_time_rel"] == 1.0 and rows["lora"]["peak_mem_rel"] > 1.0  # vs the first method
    for png in doc["plots"].values():
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    # repeated: finished runs are reused; one whose result was lost after its last checkpoint is resumed
    (Path(rows["lora"]["seeds"][1]["run_dir"]) / "result.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    redo = json.loads(again.stdout)
    assert redo["runs"]["reused"] == 7 and redo["methods"][1]["acc"] == rows["lora"]["acc"]


def _noisy_test_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits test split with its labels replaced by random ones (train and val untouched)."""
    from utune.data.datasets import registry

    entry = registry.ENTRIES["digits"]

    def load(source, split, transform):
        ds = entry.load(source, split, transform)
        if split == "test":
            ds.targets = [int(v) for v in np.random.default_rng(1).integers(0, 10, len(ds))]
        return ds

    monkeypatch.setitem(registry.ENTRIES, "digits", dataclasses.replace(entry, load=load))


def test_selection_never_reads_the_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    methods = [Method(p) for p in _specs(tmp_path)]
    grid = parse_grid(lr_grid="0.1x,1x,3x")
    clean = compare(methods, out=tmp_path / "clean", seeds=1, grid=grid)
    _noisy_test_labels(monkeypatch)
    noisy = compare(methods, out=tmp_path / "noisy", seeds=1, grid=grid)
    for a, b in zip(clean["methods"], noisy["methods"], strict=True):
        assert a["selected"] == b["selected"] and a["lr"] in (1e-3, 1e-2, 3e-2)
        assert [s["val_acc"] for s in a["selection"]] == [s["val_acc"] for s in b["selection"]]
        assert [s["val_loss"] for s in a["selection"]] == [s["val_loss"] for s in b["selection"]]
    assert [m["acc"] for m in clean["methods"]] != [m["acc"] for m in noisy["methods"]]  # the noise did reach test


def test_intervals_and_grids() -> None:
    assert mean_ci([0.5, 0.6, 0.7])["t"] == pytest.approx(4.303, abs=1e-3)
    assert mean_ci([0.5, 0.6, 0.7])["ci"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-4)
    assert mean_ci([0.8])["ci"] is None
    assert parse_grid(["tuners.0.rank=2,4"], "1e-3,1e-2") == {"tuners.0.rank": ["2", "4"], "train.lr": ["1e-3", "1e-2"]}
    for bad in (["train.lr=1e-3,,1e-2"], ["lr"], ["train.lr=1,1"]):
        with pytest.raises(UserInputError):
            parse_grid(bad)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    spec = _specs(tmp_path)[0]
    for extra in (["--seeds", "0"], ["--lr-grid", "1e-3,,2"], ["--val-size", "-1"]):
        proc = subprocess.run(
            [sys.executable, "-m", "utune", "compare", str(spec), *extra, "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_stops_with_a_checkpoint_and_the_rerun_continues(tmp_path: Path) -> None:
    spec = _specs(tmp_path)[1]
    # long enough to be caught mid-run
    slow = spec.read_text().replace("epochs: 1, max_steps: 6", "epochs: 10, max_steps: 150")
    spec.write_text(slow)
    cmd = [sys.executable, "-m", "utune", "compare", str(spec), "--seeds", "1", "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UTUNE_QUIET": "0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "run 1/1" in line:
            break
    run_dir = next(iter((tmp_path / "o" / "lora").glob("seed-0-*")), None)
    deadline = time.monotonic() + 120
    while (run_dir is None or not list((run_dir / "metrics.jsonl").parent.glob("metrics.jsonl"))) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
        run_dir = next(iter((tmp_path / "o" / "lora").glob("seed-0-*")), None)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "interrupted during lora" in rest and "Traceback" not in rest
    assert run_dir is not None and not (run_dir / "result.json").exists()
    again = subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["methods"][0]["seeds"][0]["run_dir"] == str(run_dir)

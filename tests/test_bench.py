"""The benchmark script runs end to end on a tiny model and writes its results (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_methods_runs_on_a_tiny_model(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_methods.py"),
        "--model",
        "test_vit",
        "--img-size",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--methods",
        "full,lora,bypass",
        "--name",
        "tiny",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"full", "lora", "bypass"} and not any("error" in r for r in rows.values())
    assert rows["full"]["step_vs_full"] == 1.0 and rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert data["machine"]["cores"] and (tmp_path / "tiny.md").read_text().startswith("Machine:")


def test_bench_gpu_runs_every_row_on_the_cpu(tmp_path: Path) -> None:
    """bench/gpu.sh's script with --device cpu and test_vit at 32 px: every method, compile off and on."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--model", "test_vit"]
    cmd += ["--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--in-process"]
    # Dynamo's capture without codegen: inductor's C++ build would take ~45 s a row on 2 cores
    cmd += ["--compile-backend", "eager", "--peak-tflops", "0.1", "--name", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["device_name"] == "cpu" and data["machine"]["cores"]
    rows = {(r["method"], r["compile"]): r for r in data["rows"]}
    methods = ("full", "linear", "lora", "utuning_dual", "bypass")
    assert set(rows) == {(m, c) for m in methods for c in (False, True)}
    numbers = ("images_per_s", "step_s", "compile_s", "forward_gflops_per_image", "train_over_forward", "mfu")
    for row in rows.values():
        assert all(isinstance(row[k], float) and row[k] >= 0 for k in (*numbers, "peak_memory_mb")), row
    # the FLOP convention, counted: full fine-tuning ~3x forward, a frozen backbone with tuners inside ~2x,
    # linear probing and bypass (no gradient through the backbone) ~1x
    assert 2.5 < rows["full", False]["train_over_forward"] <= 3.0
    assert 1.5 < rows["lora", False]["train_over_forward"] < 2.2
    assert rows["linear", False]["train_over_forward"] < 1.1 and rows["bypass", False]["train_over_forward"] < 1.3
    assert (tmp_path / "tiny.md").read_text().count("\n| ") == 11  # header + 10 rows


def test_bench_data_records_transform_cost_loader_and_model_rates(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_data.py"), "--model", "test_vit", "--img-size", "32"]
    cmd += ["--images", "8", "--batch", "4", "--batches", "2", "--steps", "1", "--repeat", "1", "--workers", "0,1,auto"]
    cmd += ["--name", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["bytes_per_image"] == {"float32": 4 * 3 * 32 * 32, "uint8": 3 * 32 * 32}
    assert [r["label"] for r in data["loader"]] == ["0", "1", "auto"] and all(
        r["images_per_s"] > 0 for r in data["loader"]
    )
    assert data["cpu_ms_per_image"]["uint8"] > 0 and data["model_images_per_s"] > 0
    assert "model training" in (tmp_path / "tiny.md").read_text()


def test_bench_build_runs_on_a_tiny_model(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_build.py"),
        "--cases",
        "tiny",
        "--inspect",
        "test_vit",
        "--old-inspect",
        "test_vit",
        "--repeats",
        "1",
        "--name",
        "tiny",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "tiny.json").read_text())
    row = data["build"][0]
    assert row["bit_identical"] == {"file": True, "random init": True}
    assert set(row["median_s"]) >= {
        "timm.create_model",
        "build (file)",
        "build (random init)",
        "old build (file)",
        "old build (random init)",
    }
    ins = data["inspect"]["rows"][0]
    assert ins["sites"] > 0 and ins["peak_rss_mb"] > 0 and "old_s" in ins
    assert (tmp_path / "tiny.md").read_text().startswith("# Build and inspect speed")

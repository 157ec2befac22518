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

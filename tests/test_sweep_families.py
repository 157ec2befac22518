"""The family sweep (bench/sweep_families.py) runs end to end on three small models and records each pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_records_every_pair_with_its_status(tmp_path: Path) -> None:
    models = ["test_vit", "test_resnet", "torchvision:shufflenet_v2_x0_5"]
    cmd = [sys.executable, str(ROOT / "bench" / "sweep_families.py"), "--models", *models, "--out", str(tmp_path)]
    cmd += ["--name", "tiny", "--timeout", "240"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert list(rows) == models and data["machine"]["cores"]
    for model in ("test_vit", "test_resnet"):
        assert {t: rows[model][t]["status"] for t in ("lora", "adapter", "ssf")} == dict.fromkeys(
            ("lora", "adapter", "ssf"), "pass"
        ), rows[model]
        assert rows[model]["adapter"]["diff"] <= 1e-5 * max(rows[model]["adapter"]["scale"], 1.0)
    shuffle = rows["torchvision:shufflenet_v2_x0_5"]
    assert shuffle["adapter"]["status"] == "pass"  # its channel shuffle hides the layout: the readers tell it
    lora = shuffle["lora"]
    assert lora["status"] == "pass" or (lora["status"] == "refused" and "grouped/depthwise" in lora["reason"])
    summary = data["summary"]
    assert summary["pairs"] == 9 and sum(summary["counts"].values()) == 9 and "crash" not in summary["counts"]
    md = (tmp_path / "tiny.md").read_text()
    assert md.startswith("Machine:") and "| test_resnet |" in md


def test_ssf_rule_selects_every_norm_class_of_torch_and_timm() -> None:
    sys.path.insert(0, str(ROOT))
    import timm.layers
    from torch import nn

    from bench.sweep_families import NORMS

    # RmsNormFp32 (deepseek_vit) subclasses no other norm: a list of base classes alone missed it
    assert {"RmsNormFp32", "SimpleNorm2dFp32", "_BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm"} <= set(NORMS)
    for cls in (timm.layers.RmsNormFp32, timm.layers.LayerNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d):
        assert {c.__name__ for c in cls.__mro__} & set(NORMS), cls

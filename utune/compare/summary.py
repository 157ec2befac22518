"""The comparison's result: one row per method (mean ± 95 % CI over seeds, cost relative to a reference),
written to ``compare.json`` and ``compare.md`` beside the two plots."""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .stats import agree, mean_ci, t_quantile, welch


def ci_note(rows: list[dict[str, Any]]) -> str:
    """How the intervals were made, with the seed counts and t values these rows actually used."""
    counts = sorted({len(r.get("acc") or []) for r in rows} - {0, 1})
    text = "95 % CI of the mean over seeds: Student-t with n-1 degrees of freedom"
    if not counts:
        return text + " (no interval: fewer than two seeds)"
    return text + " (" + "; ".join(f"n = {n}: t = {t_quantile(n - 1):.3f}" for n in counts) + ")"


def _final_row(plan: Any) -> dict[str, Any]:
    finals = [plan.results.get(t.run_dir, {"error": "not run"}) for t in plan.final]
    good = [r for r in finals if "error" not in r]
    errors = sorted({r["error"] for r in finals if "error" in r})
    accs = [r["acc"] for r in good]
    stats = mean_ci(accs)
    first = good[0] if good else {}
    memory = next((r["peak_tensor_bytes"] for r in good if "peak_tensor_bytes" in r), None)
    steps = [r["step_time_s"] for r in good if r.get("step_time_s")]
    return {
        "error": "; ".join(errors) or None,
        "trainable_params": first.get("trainable_params"),
        "total_params": first.get("total_params"),
        "trainable_pct": first.get("trainable_pct"),
        "n_test": first.get("n"),
        "split": first.get("split", "test"),  # val where the data has no test split
        "n_train": first.get("n_train"),
        "seeds": [
            {"seed": r["task"]["seed"], "acc": r["acc"], "loss": r["loss"], "run_dir": r["task"]["run_dir"]}
            for r in good
        ],
        "acc": accs,
        "acc_mean": stats["mean"],
        "acc_sd": stats["sd"],
        "acc_ci95": stats["ci"],
        "note": "the seeds agree (every seed scored the same)" if len(accs) > 1 and agree(accs) else None,
        "step_time_s": statistics.median(steps) if steps else None,
        "peak_tensor_bytes": memory,
        "max_rss_bytes": max((r.get("max_rss_bytes") or 0 for r in good), default=None) or None,
        "train_time_s": [r.get("train_time_s") for r in good],
    }


def _selection(plan: Any) -> list[dict[str, Any]]:
    rows = []
    for t in plan.select:
        r = plan.results.get(t.run_dir, {"error": "not run"})
        rows.append(
            {
                "point": t.point,
                "val_acc": r.get("acc"),
                "val_loss": r.get("loss"),
                "n_val": r.get("n"),
                "error": r.get("error"),
                "run_dir": t.run_dir,
            }
        )
    return rows


def _at_edge(plan: Any) -> list[str]:
    """Keys whose chosen value is the first or last of 3+ listed: the optimum may lie outside the grid."""
    keys = []
    for key in plan.chosen or {}:
        values = list(dict.fromkeys(p[key] for p in plan.points))
        if len(values) >= 3 and plan.chosen[key] in (values[0], values[-1]):
            keys.append(key)
    return keys


def _method_row(plan: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"method": plan.method.label, "spec": str(plan.method.spec)}
    if plan.error is not None and not plan.final:
        return {**row, "error": plan.error, "acc": [], "acc_mean": None, "acc_ci95": None, "selection": []}
    row.update(_final_row(plan))
    row.update(selected=plan.chosen, at_grid_edge=_at_edge(plan), selection=_selection(plan))
    lr = (plan.chosen or {}).get("train.lr")
    row["lr"] = float(lr) if lr is not None else (plan.spec_dict or {}).get("train", {}).get("lr")
    return row


def _reference(rows: list[dict[str, Any]]) -> str | None:
    """Full fine-tuning (100 % trainable) when it ran, else the first method that did."""
    ok = [r for r in rows if r.get("acc_mean") is not None]
    full = [r for r in ok if (r.get("trainable_pct") or 0) >= 99.999]
    return (full or ok or [{}])[0].get("method")


def _relative(rows: list[dict[str, Any]], ref_name: str | None) -> None:
    ref = next((r for r in rows if r["method"] == ref_name), None)
    for r in rows:
        for key, rel in (("step_time_s", "step_time_rel"), ("peak_tensor_bytes", "peak_mem_rel")):
            base = ref.get(key) if ref else None
            r[rel] = r[key] / base if base and r.get(key) is not None else None
        if ref is not None and r is not ref and len(r.get("acc", [])) > 1:
            r["p_vs_reference"] = welch(r["acc"], ref["acc"])


def summarise(plans: list[Any], out: Path, settings: Mapping[str, Any], wall_s: float) -> dict[str, Any]:
    rows = [_method_row(p) for p in plans]
    ref = _reference(rows)
    _relative(rows, ref)
    results = [r for p in plans for r in p.results.values()]
    dataset = next((p.spec_dict["data"]["dataset"] for p in plans if p.spec_dict), None)
    doc = {
        "utune_compare": 1,
        "dataset": dataset,
        "settings": dict(settings),
        "ci": ci_note(rows),
        "memory": "peak live tensor bytes over two training steps (parameters, saved activations, gradients, "
        "optimizer state), measured by utune.compare.memory; max_rss_bytes is the process's peak RSS",
        "reference": ref,
        "methods": rows,
        "runs": {
            "total": len(results),
            "reused": sum(bool(r.get("reused")) for r in results),
            "failed": sum("error" in r for r in results),
        },
        "wall_s": round(wall_s, 1),
        "machine": machine(),
    }
    out.mkdir(parents=True, exist_ok=True)
    from utune._fs import write_text_atomic

    from .plots import plot_all
    from .table import markdown

    doc["plots"] = plot_all(doc, out)
    write_text_atomic(out / "compare.json", json.dumps(doc, indent=2, default=str) + "\n", what="comparison")
    write_text_atomic(out / "compare.md", markdown(doc), what="comparison table")
    return doc


def machine() -> dict[str, Any]:
    import os

    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_end": [round(v, 2) for v in load] if load else None,
    }

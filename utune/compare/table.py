"""The comparison as table rows (for the CLI's Rich table) and as Markdown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COLUMNS = ["method", "trainable params", "acc (mean ± 95% CI)", "seeds", "selected", "step time", "peak memory"]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _ratio(rel: float | None, absolute: float | None, unit: str) -> str:
    if rel is None:
        return "-"
    if absolute is not None and abs(rel - 1.0) < 1e-9:
        return f"1.00 ({absolute:.3g} {unit})"
    return f"{rel:.2f}"


def _selected(row: Mapping[str, Any]) -> str:
    chosen = row.get("selected") or {}
    text = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in chosen.items()) or "spec"
    return text + (" (edge)" if row.get("at_grid_edge") else "")


def rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """One row per method; a failed method shows its error in place of the numbers."""
    table = []
    for r in doc["methods"]:
        if r.get("acc_mean") is None:
            table.append([r["method"], "-", f"failed: {r.get('error')}", "0", "-", "-", "-"])
            continue
        acc = f"{_pct(r['acc_mean'])} ± {_pct(r['acc_ci95'])}" if r.get("acc_ci95") is not None else _pct(r["acc_mean"])
        if r.get("error"):
            acc += f" (some seeds failed: {r['error']})"
        elif r.get("note"):
            acc += f" ({r['note']})"
        mem = r.get("peak_tensor_bytes")
        table.append(
            [
                r["method"],
                f"{r['trainable_params']:,}",
                acc,
                str(len(r["acc"])),
                _selected(r),
                _ratio(r.get("step_time_rel"), r.get("step_time_s"), "s"),
                _ratio(r.get("peak_mem_rel"), mem / 2**20 if mem else None, "MiB"),
            ]
        )
    return table


def caption(doc: Mapping[str, Any]) -> str:
    splits = sorted({r.get("split") or "test" for r in doc["methods"] if r.get("acc_mean") is not None}) or ["test"]
    note = "" if splits == ["test"] else " (the data has no test split: scored on its val split)"
    return (
        f"{doc['dataset']}: {'/'.join(splits)} accuracy (%){note} of the final checkpoint, mean ± 95 % CI over "
        "seeds (Student-t); "
        f"hyper-parameters chosen on a validation split carved from the training data; step time and peak "
        f"tensor memory relative to {doc['reference']}"
    )


def markdown(doc: Mapping[str, Any]) -> str:
    body = rows(doc)
    lines = [f"<!-- utune compare: {caption(doc)} -->", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"

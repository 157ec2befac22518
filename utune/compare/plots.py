"""Two plots of a comparison: accuracy against trainable parameters and against peak memory, with the
95 % CI as error bars (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _scatter(rows: list[Mapping[str, Any]], x_key: str, xlabel: str, title: str, path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for r in rows:
        x = r[x_key] / scale
        ax.errorbar(x, 100 * r["acc_mean"], yerr=100 * (r["acc_ci95"] or 0), fmt="o", capsize=3)
        ax.annotate(r["method"], (x, 100 * r["acc_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%), mean ± 95 % CI over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_all(doc: Mapping[str, Any], out: Path) -> dict[str, str]:
    """``accuracy_vs_params.png`` and ``accuracy_vs_memory.png`` in ``out``; returns their paths."""
    done = [r for r in doc["methods"] if r.get("acc_mean") is not None]
    paths: dict[str, str] = {}
    if not done:
        return paths
    title = f"utune compare: {doc['dataset']}"
    params = out / "accuracy_vs_params.png"
    _scatter(done, "trainable_params", "trainable parameters (log)", title, params, 1.0)
    paths["accuracy_vs_params"] = str(params)
    with_mem = [r for r in done if r.get("peak_tensor_bytes")]
    if with_mem:
        memory = out / "accuracy_vs_memory.png"
        _scatter(with_mem, "peak_tensor_bytes", "peak training tensor memory (MiB, log)", title, memory, 2**20)
        paths["accuracy_vs_memory"] = str(memory)
    return paths

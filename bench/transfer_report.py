"""The transfer benchmark's Markdown report and plot, from the result ``bench/transfer.py`` assembles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utune.compare.stats import t_quantile, welch

ALPHA = 0.05


def _rows(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in task["methods"]}


def _cell(r: dict[str, Any] | None) -> str:
    if r is None or r.get("acc_mean") is None:
        return "failed" if r else "-"
    ci = r.get("acc_ci95")
    return f"{100 * r['acc_mean']:.2f} ± {100 * ci:.2f}" if ci is not None else f"{100 * r['acc_mean']:.2f}"


def _best(rows: dict[str, dict[str, Any]]) -> str:
    ok = [r for r in rows.values() if r.get("acc_mean") is not None]
    return max(ok, key=lambda r: r["acc_mean"])["method"]


def top_group(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The best method and every method whose seeds a Welch t-test cannot tell from it (p >= 0.05)."""
    best = rows[_best(rows)]
    group = []
    for r in sorted(rows.values(), key=lambda r: -(r.get("acc_mean") or 0)):
        if r.get("acc_mean") is None:
            continue
        p = welch(r["acc"], best["acc"]) if r is not best else 1.0
        if p is not None and p >= ALPHA:
            group.append(r["method"])
    return group


def _main_table(result: dict[str, Any]) -> list[str]:
    tasks = result["tasks"]
    rows = [_rows(t) for t in tasks]
    head = ["method", "trainable params"] + [t["task"] for t in tasks] + ["step time vs full", "peak memory vs full"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    bests = [_best(r) for r in rows]
    for name in result["settings"]["methods"]:
        first = rows[0].get(name, {})
        cells = []
        for r, best in zip(rows, bests, strict=True):
            text = _cell(r.get(name))
            cells.append(f"**{text}**" if name == best else text)
        params = f"{first['trainable_params']:,}" if first.get("trainable_params") else "-"
        step = f"{first['step_time_rel']:.2f}" if first.get("step_time_rel") else "-"
        mem = f"{first['peak_mem_rel']:.2f}" if first.get("peak_mem_rel") else "-"
        lines.append(f"| {name} | {params} | " + " | ".join(cells) + f" | {step} | {mem} |")
    return lines


def _lr_table(result: dict[str, Any]) -> list[str]:
    tasks = result["tasks"]
    lines = ["| method | " + " | ".join(t["task"] for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name in result["settings"]["methods"]:
        cells = []
        for t in tasks:
            r = _rows(t).get(name, {})
            lr = r.get("lr")
            cells.append("-" if lr is None else f"{lr:g}" + (" (edge)" if r.get("at_grid_edge") else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _significance(result: dict[str, Any]) -> list[str]:
    lines = []
    for t in result["tasks"]:
        rows = _rows(t)
        group = top_group(rows)
        ref = {n: rows[n] for n in ("linear", "full") if n in rows}
        beats = {
            n: [
                m
                for m, r in rows.items()
                if m != n
                and r.get("acc_mean") is not None
                and r["acc_mean"] > ref[n]["acc_mean"]
                and (welch(r["acc"], ref[n]["acc"]) or 1) < ALPHA
            ]
            for n in ref
        }
        lines.append(
            f"- **{t['task']}** ({t['title']}): best {_best(rows)}; not significantly different from it "
            f"(Welch p >= {ALPHA}): {', '.join(group)}."
        )
        for n, winners in beats.items():
            lines.append(f"  Significantly above {n}: {', '.join(winners) or 'none'}.")
    return lines


def _reference_name(result: dict[str, Any]) -> str:
    ref = result["tasks"][0].get("reference")
    return "full fine-tuning" if ref in (None, "full") else f"`{ref}` (no full fine-tuning in this run)"


def markdown(result: dict[str, Any], png: str) -> str:
    m = result["machine"]
    s = result["settings"]
    timing = "; ".join(
        f"{t['task']} {t['wall_s'] / 60:.1f} min (load average {t['load_avg']['start'][0]:.2f} at start, "
        f"{t['load_avg']['end'][0]:.2f} at end)"
        for t in result["tasks"]
    )
    runs = sum(t["runs"]["total"] for t in result["tasks"])
    reused = sum(t["runs"]["reused"] for t in result["tasks"] if t.get("timing") != "kept")
    kept = (
        " (the times are those of the run that trained them; this table was re-rendered)"
        if all(t.get("timing") == "kept" for t in result["tasks"])
        else ""
    )
    out = [
        f"Machine: {m['summary']}",
        "",
        f"Transfer benchmark (`python bench/transfer.py`): {len(s['methods'])} methods x {len(result['tasks'])} tasks, "
        f"lr chosen from {'/'.join(s['lr_grid']['train.lr'])} of each spec's on 200 validation images carved from "
        f"the 1,000 training images, then {s['seeds']} seeds on all 1,000, scored on the full test split. "
        f"{runs} runs ({reused} reused{kept}), {s['jobs']} at a time, {s['threads']} torch thread each: "
        f"**{result['wall_s'] / 60:.1f} min** in all ({timing}).",
        "",
        f"Test accuracy (%), mean ± 95 % CI over seeds (Student-t, {s['seeds'] - 1} degrees of freedom: "
        f"t = {t_quantile(s['seeds'] - 1):.3f}); bold: the best "
        "mean. Step time (training steps only, from the runs' metrics; the machine was shared, compare within "
        "the column) and peak tensor memory (parameters, saved activations, gradients, optimizer state; "
        f"`utune.compare.memory`) relative to {_reference_name(result)} on the {result['tasks'][0]['task']} task.",
        "",
        *_main_table(result),
        "",
        "Selected learning rates ((edge): the first or last of the three; the optimum may lie beyond):",
        "",
        *_lr_table(result),
        "",
        f"Which differences are significant (Welch's t-test over the {s['seeds']} seeds, p < 0.05; "
        "with so few seeds a test "
        f"finds only large, consistent gaps, and {len(s['methods'])} methods make many comparisons: read these as "
        "indications):",
        "",
        *_significance(result),
        "",
        f"![accuracy against trainable parameters]({png})",
        "",
    ]
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against trainable parameters (one panel per task) and against peak memory (held-out task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), dpi=110)
    panels = [(t, "trainable_params", "trainable parameters (log)", 1.0) for t in tasks]
    panels.append((tasks[0], "peak_tensor_bytes", "peak training tensor memory, MiB (log)", 2**20))
    for ax, (task, key, xlabel, scale) in zip(axes.flat, panels, strict=False):
        for r in task["methods"]:
            if r.get("acc_mean") is None or not r.get(key):
                continue
            x, y = r[key] / scale, 100 * r["acc_mean"]
            ax.errorbar(x, y, yerr=100 * (r.get("acc_ci95") or 0), fmt="o", capsize=3, ms=4)
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%), mean ± 95 % CI")
        ax.set_title(f"{task['task']}: {task['title']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("utune transfer benchmark: 28 px ViT pre-trained on 6 Fashion-MNIST classes, 1,000 images a task")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Re-render ``NAME.md`` and ``NAME.png`` from ``NAME.json`` (no run is touched)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("result", type=Path, help="e.g. bench/results/transfer_cpu.json")
    args = p.parse_args(argv)
    result = json.loads(args.result.read_text())
    png = args.result.with_suffix(".png")
    plot(result, png)
    args.result.with_suffix(".md").write_text(markdown(result, png.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

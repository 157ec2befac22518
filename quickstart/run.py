"""utune's quickstart: tune a ViT that utune pre-trained on Fashion-MNIST on a different real dataset.

    python quickstart/run.py                 # what `make quickstart` runs (about 2 minutes on 2 CPU cores)
    python quickstart/run.py --smoke         # three methods, a few steps each: checks the pipeline in seconds
    python quickstart/run.py --methods linear,lora --out runs/qs

Every method is a spec in ``quickstart/methods/`` that loads the shipped backbone
(``quickstart/vit_fmnist6.safetensors``, pre-trained on six Fashion-MNIST classes, see ``quickstart/README.md``)
and tunes it on scikit-learn's handwritten digits through utune's own API: ``utune.build`` (the graph surgery),
``utune.runs.train_run`` (what ``utune apply --train`` runs), ``utune.runs.eval_run`` (what
``utune eval`` runs) and ``utune.export`` (merged LoRA weights, U-Tuning tuners only). It writes into the
run folder (default ``runs/quickstart-<time>/``): one sub-folder per method (spec, metrics, checkpoints),
``results.json``, ``results.md``, ``accuracy_vs_params.png``, ``structure.png`` and ``export/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "vit_fmnist6.safetensors"

# key, label, spec (in quickstart/methods/), short description of where its tuners sit
METHODS: list[tuple[str, str, str]] = [
    ("linear", "Linear probing", "linear.yaml"),
    ("full", "Full fine-tuning", "full.yaml"),
    ("utuning", "U-Tuning (dual P-Adapter)", "utuning.yaml"),
    ("lora", "LoRA (q, v)", "lora.yaml"),
    ("vpt_deep", "VPT-Deep", "vpt_deep.yaml"),
    ("bypass", "Res-Tuning-Bypass", "bypass.yaml"),
]
SMOKE_METHODS = ("utuning", "lora")
SPREAD_NOTE = (
    "One seed on 360 test images: another seed (or machine) moves each number by up to about 2 points "
    "(quickstart/README.md, 'Results'); the benchmark's digits task gives every method's mean ± 95 % CI."
)
SMOKE_OVERRIDES = ("train.epochs=1", "train.max_steps=2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/quickstart-<time>)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(m[0] for m in METHODS)}")
    p.add_argument("--smoke", action="store_true", help="U-Tuning and LoRA, 2 steps each: a fast end-to-end check")
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="the pre-trained backbone (default: the shipped one)")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("UTUNE_QS_THREADS", "1")),
        help="torch intra-op threads (default 1: faster than 2 on a busy 2-core machine, see README)",
    )
    p.add_argument(
        "--augment",
        choices=("none", "timm", "crop"),
        default="none",
        help="training-split transform (data.augment): none (the specs' choice: the evaluation resize), timm\n"
        "(timm's random-resized crop, flip, colour jitter) or crop (zero-padded random crops); see README",
    )
    p.add_argument("--no-export", action="store_true", help="skip the export step")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for every method, e.g. train.epochs=2")
    return p.parse_args(argv)


# ---- running the methods ----------------------------------------------------------------------------


def run_method(key: str, label: str, spec_file: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """build -> train_run -> eval_run for one spec; returns its row of the results."""
    import utune
    from utune.runs import eval_run, train_run

    t0 = time.perf_counter()
    built = utune.build(spec_file, overrides)
    t_built = time.perf_counter()
    summary = train_run(built, out / key, resume=False)
    t_trained = time.perf_counter()
    # the final checkpoint, rebuilt from the run folder as `utune eval` does (digits: test = the held-out 360)
    ev = eval_run(out / key, split="test", which="latest")
    t_done = time.perf_counter()
    report = built.report
    trainable_base = {n for n, p in built.model.named_parameters() if p.requires_grad and not n.startswith("utune.")}
    rules = [
        {
            **{k: r[k] for k in ("name", "kind", "placement", "sites", "params", "attachments")},
            "options": _options(built.spec, r),
        }
        for r in report["tuners"]
    ]
    return {
        "key": key,
        "method": label,
        "spec": str(spec_file),
        "test_acc": ev["acc"],
        "test_n": ev["n"],
        "test_loss": ev["loss"],
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"],
        "trainable_pct": report["trainable_pct"],
        "tuner_params": report["tuner_params"],
        "train_time_s": summary["time_s"],
        "images_per_s": summary["images_per_s"],
        "steps": summary["step"],
        "epochs": summary["epoch"],
        "wall_s": round(t_done - t0, 2),
        "build_s": round(t_built - t0, 2),
        "eval_s": round(t_done - t_trained, 2),
        "tuners": rules,
        "trainable_base": sorted(trainable_base),
        "n_blocks": _n_blocks(built.base),
        "run_dir": str(out / key),
        "seed": built.spec.train.seed,
    }


def _options(spec: Any, rule_report: dict[str, Any]) -> dict[str, Any]:
    for rule in spec.tuners:
        if rule.name == rule_report["name"]:
            d = rule.model_dump(mode="json")
            return {**(d.get("options") or {}), "tap": d.get("tap")}
    return {}


def _n_blocks(model: Any) -> int:
    idx = {int(m.group(1)) for n, _ in model.named_modules() if (m := re.match(r"^blocks\.(\d+)$", n))}
    return max(idx) + 1 if idx else 0


# ---- export -----------------------------------------------------------------------------------------


def export_step(out: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LoRA folded into plain weights (checked by re-scoring them as a plain timm model); U-Tuning tuners only."""
    try:
        from utune.export import export
        from utune.runs import load_run
    except ImportError:  # pragma: no cover - utune without its export package
        print("TODO export: utune.export is not available; skipped (LoRA --merge, U-Tuning --tuners-only)")
        return []
    done = []
    by_key = {r["key"]: r for r in results}
    folder = out / "export"
    folder.mkdir(parents=True, exist_ok=True)
    if "lora" in by_key:
        built = load_run(out / "lora")
        path = folder / "lora_merged.safetensors"
        res = export(built, "merge", path, force=True)
        check = res.get("verify")
        acc = _plain_accuracy(path, built.spec)
        done.append(
            {
                "what": "LoRA merged into plain ViT weights",
                "path": str(path),
                "bytes": res["bytes"],
                "verify_max_abs_diff": getattr(check, "max_abs_diff", None),
                "plain_model_test_acc": acc,
                "tuned_test_acc": by_key["lora"]["test_acc"],
            }
        )
    if "utuning" in by_key:
        built = load_run(out / "utuning")
        path = folder / "utuning_tuners.safetensors"
        res = export(built, "tuners-only", path, force=True)
        done.append(
            {"what": "U-Tuning tuners only", "path": str(path), "bytes": res["bytes"], "tensors": res["tensors"]}
        )
    return done


def _plain_accuracy(weights: Path, spec: Any) -> float:
    """Score a merged file as a plain (untouched) timm model: no tuners, strict load of every key."""
    import torch

    from utune.models import create_model, data_config
    from utune.runs import build_loaders
    from utune.train.loop import evaluate

    m = spec.model
    model = create_model(m.name, pretrained=False, num_classes=m.num_classes, kwargs=dict(m.kwargs))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(weights)), strict=True)
    loaders = build_loaders(spec.data, data_config(model), spec.train, splits=("test",))
    return float(evaluate(model, loaders["test"], torch.device("cpu"))["acc"])


# ---- outputs ----------------------------------------------------------------------------------------


def fmt_params(n: int) -> str:
    return f"{n:,}"


def where(row: dict[str, Any]) -> str:
    if not row["tuners"]:
        return "head only" if row["trainable_pct"] < 50 else "every weight"
    parts = []
    for r in row["tuners"]:
        sites = r["sites"]
        glob = re.sub(r"\.\d+(?=\.|::|$)", ".*", sites[0], count=1) if sites else "-"
        parts.append(f"{r['kind']} @ {glob} x{len(sites)}")
    return "; ".join(parts) + " + head"


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "| method | test acc | trainable params | trainable % | train time (s) | tuners |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['test_acc']:.2f} % | {fmt_params(r['trainable_params'])} "
            f"| {r['trainable_pct']:.2f} | {r['train_time_s']:.1f} | {where(r)} |"
        )
    head = (
        f"Digits (scikit-learn, {meta['train_n']} train / {rows[0]['test_n'] if rows else 0} test), backbone "
        f"{meta['backbone']} pre-trained by utune on 6 Fashion-MNIST classes; seed {meta['seed']}, "
        f"{meta['threads']} torch thread(s).\n\n"
    )
    text = head + "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"utune quickstart: {meta['title']}", title_justify="left")
    for col, just in (
        ("method", "left"),
        ("test acc", "right"),
        ("trainable params", "right"),
        ("trainable %", "right"),
        ("train time", "right"),
        ("img/s", "right"),
    ):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(
            r["method"],
            f"{100 * r['test_acc']:.2f} %",
            fmt_params(r["trainable_params"]),
            f"{r['trainable_pct']:.2f} %",
            f"{r['train_time_s']:.1f} s",
            f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-",
        )
    Console(width=120).print(t)


def plot_accuracy(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        x, y = r["trainable_params"], 100 * r["test_acc"]
        ax.scatter([x], [y], s=70, color=cmap(i), zorder=3, edgecolor="black", linewidth=0.6)
        ax.annotate(
            f"{r['method']}\n{y:.1f} %, {x:,}",
            (x, y),
            textcoords="offset points",
            xytext=(7, 5 if i % 2 == 0 else -22),
            fontsize=8,
        )
    ax.set_xscale("log")
    xs = [r["trainable_params"] for r in rows]
    ax.set_xlim(min(xs) / 3, max(xs) * 12)
    ys = [100 * r["test_acc"] for r in rows]
    ax.set_ylim(min(ys) - max(3.0, 0.15 * (max(ys) - min(ys))), min(100.5, max(ys) + 2.0))
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# Where a site sits in a pre-norm ViT block: (block index, slot). Slots: mha, ffn, block; None = outside blocks.
_SITE_PATTERNS = [
    (re.compile(r"^blocks\.(\d+)(\.(attn|norm1|ls1)\b.*|::add)$"), "mha"),
    (re.compile(r"^blocks\.(\d+)(\.(mlp|norm2|ls2)\b.*|::add_1)$"), "ffn"),
    (re.compile(r"^blocks\.(\d+)$"), "block"),
]


def site_slot(path: str) -> tuple[int | None, str]:
    for pat, slot in _SITE_PATTERNS:
        m = pat.match(path)
        if m:
            return int(m.group(1)), slot
    return None, "other"


def _tuner_label(rule: dict[str, Any], site: str) -> str:
    kind, opts = rule["kind"], rule.get("options", {})
    detail = site.split("::")[-1] if "::" in site else site.rsplit(".", 1)[-1]
    if kind == "adapter":
        reads = {"parent.input": "block input", "input": "residual"}.get(opts.get("tap") or "", opts.get("tap") or "")
        name = "P-Adapter" if rule["placement"] == "parallel" else "adapter"
        return f"{name} L={opts.get('dim', '?')}\n{rule['placement']}" + (f", reads {reads}" if reads else "")
    if kind == "lora":
        sl = ",".join(opts.get("slices") or []) or detail
        return f"LoRA r={opts.get('rank', '?')}\n{detail}: {sl}"
    if kind == "prompt":
        return f"{opts.get('length', '?')} prompts\n{rule['placement']}"
    if kind == "bypass":
        return f"side adapters\nL={opts.get('dim', '?')}"
    return f"{kind}\n{rule['placement']}"


def plot_structure(path: Path, rows: list[dict[str, Any]]) -> None:
    """One panel per method: the ViT's blocks (MHA, FFN) and the tuners drawn where its report puts them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    frozen, trainable = "#d9d9d9", "#f6b26b"
    colors = ["#6fa8dc", "#93c47d", "#c27ba0", "#8e7cc3", "#e06666", "#76a5af"]
    n = max(r["n_blocks"] for r in rows) or 1
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows), 1.15 * n + 2.6), dpi=110, squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        ax.set_xlim(0, 10)
        ax.set_ylim(-1.6, n * 2 + 2.2)
        ax.axis("off")
        tb = row["trainable_base"]

        def is_trainable(prefix: str, tb: list[str] = tb) -> bool:
            return any(name.startswith(prefix) for name in tb)

        def box(x, y, w, h, text, fc, ax=ax, fs=7.5, bold=False):
            ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=fc, ec="#444"))
            ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, weight="bold" if bold else None)

        def arrow(x0, y0, x1, y1, color="#444", ax=ax):
            ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=8, color=color, lw=1))

        box(1.0, -1.4, 4.0, 0.7, "patch embed", trainable if is_trainable("patch_embed") else frozen)
        arrow(3.0, -0.7, 3.0, -0.35)
        for b in range(n):
            y = 2 * b
            ax.add_patch(FancyBboxPatch((0.6, y - 0.3), 4.8, 1.85, boxstyle="round,pad=0.02", fc="white", ec="#999"))
            ax.text(0.45, y + 0.62, f"block {b}", rotation=90, ha="center", va="center", fontsize=7, color="#666")
            box(1.0, y, 4.0, 0.55, "MHA", trainable if is_trainable(f"blocks.{b}.attn") else frozen)
            box(1.0, y + 0.8, 4.0, 0.55, "FFN", trainable if is_trainable(f"blocks.{b}.mlp") else frozen)
            arrow(3.0, y + 0.55, 3.0, y + 0.8)
            if b < n - 1:
                arrow(3.0, y + 1.35, 3.0, 2 * (b + 1))
        arrow(3.0, 2 * n - 0.65, 3.0, 2 * n - 0.25)
        box(1.0, 2 * n - 0.25, 4.0, 0.6, "norm + head", trainable if is_trainable("head") else frozen)
        # the tuners, from the build's manifest (the report's attachments): one box per tuner module, beside
        # the operation it attaches to (joins without a module of their own, such as token removal, not drawn)
        legend = []
        for i, rule in enumerate(row["tuners"]):
            color = colors[i % len(colors)]
            legend.append((color, f"{rule['name']}: {rule['kind']} ({rule['placement']}), {rule['params']:,} params"))
            for site in [a["site"] for a in rule["attachments"] if a["module"] and a["params"]]:
                b, slot = site_slot(site)
                if b is None:
                    continue
                y = 2 * b
                label = _tuner_label(rule, site)
                if slot == "mha":
                    box(6.0, y, 3.6, 0.55, label, color, fs=6.5)
                    arrow(6.0, y + 0.27, 5.0, y + 0.27, color)
                elif slot == "ffn":
                    box(6.0, y + 0.8, 3.6, 0.55, label, color, fs=6.5)
                    arrow(6.0, y + 1.07, 5.0, y + 1.07, color)
                else:  # the whole block: a prompt set feeding it, or a side-network step beside it
                    box(6.0, y - 0.2, 3.6, 1.65, label, color, fs=6.5)
                    arrow(6.0, y + 0.62, 5.4, y + 0.62, color)
                    if rule["kind"] == "bypass" and b < n - 1:
                        arrow(7.8, y + 1.45, 7.8, 2 * (b + 1) - 0.2, color)
                    if rule["kind"] == "bypass" and b == n - 1:
                        arrow(7.8, y + 1.45, 5.0, 2 * n + 0.05, color)
        for j, (color, text) in enumerate(legend):
            ax.text(0.6, 2 * n + 1.55 - 0.42 * j, "■", color=color, fontsize=9, va="center")
            ax.text(1.1, 2 * n + 1.55 - 0.42 * j, text, fontsize=6.5, va="center")
        pct = row["trainable_pct"]
        ax.set_title(f"{row['method']}\n{row['trainable_params']:,} trainable ({pct:.2f} %)", fontsize=9)
    handles = [
        plt.Rectangle((0, 0), 1, 1, fc=frozen, ec="#444"),
        plt.Rectangle((0, 0), 1, 1, fc=trainable, ec="#444"),
    ]
    fig.legend(handles, ["frozen (pre-trained)", "trainable"], loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Where each method's tuners sit (drawn from utune's build report)", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("UTUNE_QUIET", "1")  # no per-run progress bars or summaries: the table is the output
    import torch

    torch.set_num_threads(max(1, args.threads))
    import utune
    from utune.models import read_state_dict

    if args.augment != "none":  # the specs say data.augment: none (tiny digits; see README)
        args.overrides = [f"data.augment={args.augment}", *args.overrides]

    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        wanted = list(SMOKE_METHODS) if args.smoke else [m[0] for m in METHODS]
    known = {m[0]: m for m in METHODS}
    unknown = [m for m in wanted if m not in known]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    weights = args.weights.resolve()
    if not weights.is_file():
        print(f"error: backbone weights {weights} not found (see quickstart/README.md)", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"model.pretrained={weights}", *(SMOKE_OVERRIDES if args.smoke else ()), *args.overrides]

    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        wmeta = f.metadata() or {}
    n_backbone = sum(t.numel() for t in read_state_dict(weights).values())
    fmnist = wmeta.get("fmnist_test_acc")
    backbone = f"ViT ({n_backbone / 1e6:.2f} M params, {wmeta.get('model_kwargs', 'small kwargs')})"
    acc = f", their test acc {100 * float(fmnist):.2f} %" if fmnist else ""
    print(
        f"utune {utune.__version__} quickstart: {len(wanted)} methods on scikit-learn digits, backbone {weights.name} "
        f"(pre-trained by utune on 6 Fashion-MNIST classes{acc}); "
        f"torch threads {torch.get_num_threads()}; writing to {out}/",
        flush=True,
    )
    rows = []
    for i, key in enumerate(wanted, start=1):
        _, label, spec_name = known[key]
        print(f"[{i}/{len(wanted)}] {label:<28}", end=" ", flush=True)
        row = run_method(key, label, HERE / "methods" / spec_name, out, overrides)
        rows.append(row)
        print(
            f"test acc {100 * row['test_acc']:6.2f} %   {row['trainable_params']:>9,} trainable   "
            f"train {row['train_time_s']:5.1f} s",
            flush=True,
        )
    exports = [] if args.no_export else export_step(out, rows)
    for e in exports:
        extra = ""
        if "plain_model_test_acc" in e:
            extra = (
                f", as a plain timm model: test acc {100 * e['plain_model_test_acc']:.2f} % "
                f"(tuned: {100 * e['tuned_test_acc']:.2f} %)"
            )
        print(f"exported {e['what']}: {e['path']} ({e['bytes'] / 1024:.0f} KiB){extra}")
    from utune.data.datasets import digits as digits_ds

    seed = rows[0]["seed"]
    meta = {
        "title": "digits, ViT pre-trained on 6 Fashion-MNIST classes",
        "backbone": backbone,
        "weights": str(weights),
        "weights_metadata": wmeta,
        "fmnist_test_acc": float(fmnist) if fmnist else None,
        "train_n": len(digits_ds._splits()["train"][1]),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_augmentation": args.augment,
        "smoke": args.smoke,
        "overrides": overrides,
        "torch": torch.__version__,
        "utune": utune.__version__,
    }
    plot_accuracy(
        out / "accuracy_vs_params.png",
        rows,
        f"digits (sklearn) from a ViT pre-trained by utune on 6 Fashion-MNIST classes (seed {seed})",
    )
    plot_structure(out / "structure.png", rows)
    md = write_markdown(out / "results.md", rows, meta)
    total = time.perf_counter() - t_start
    meta["total_s"] = round(total, 1)
    (out / "results.json").write_text(json.dumps({"meta": meta, "methods": rows, "exports": exports}, indent=2) + "\n")
    print()
    print_table(rows, meta)
    print(md.split("\n\n", 1)[0])
    print(SPREAD_NOTE)
    print(f"wrote {out}/results.json, results.md, accuracy_vs_params.png, structure.png  ({total:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The method zoo trained on the quickstart's digits task.

Each method of ``specs/README.md``'s zoo table (the LoRA family: LoRA, DoRA, LoHa, LoKr, OFT, BOFT, VeRA,
GLoRA; Convpass, RepAdapter, FacT-TT/TK, DiffFit, LN-Tune, Adapter+, VQT, a NOAH subnet), with linear probing
beside it, tunes the quickstart's backbone (a ViT that
utune pre-trained on six Fashion-MNIST classes, ``quickstart/vit_fmnist6.safetensors``: C = 96, 6 blocks, 4 x 4
patches)
on scikit-learn's digits, with the quickstart's recipe (AdamW, 10 epochs, batch 32, seed 0, one lr for all);
test accuracy is scored on the 360 held-out digits (``utune eval``). Mergeable methods are also exported
merged (``utune export --merge``) and the plain timm model re-scored. Results: ``bench/results/
zoo_digits.{json,md}``. The settings are the reference specs' scaled to this backbone (ranks and
dims as there; NOAH: the first six blocks of its CIFAR-100 subnet).

    python bench/zoo_digits.py                       # every method (about 4 min on 2 cores)
    python bench/zoo_digits.py --methods convpass,vqt train.epochs=2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE_SPEC = ROOT / "quickstart" / "methods" / "lora.yaml"  # model, data and recipe of the quickstart
HEAD = ["head"]
ATTN_FFN = ["blocks.*.attn", "blocks.*.mlp"]
QKV = "blocks.*.attn.qkv"
LINEARS = {"path": "blocks.*.**", "type": "Linear"}

METHODS: dict[str, tuple[str, list[dict[str, Any]], list[Any]]] = {
    "linear": ("Linear probing", [], HEAD),
    "lora": ("LoRA (q, v, r 8)", [{"name": "lora", "kind": "lora", "at": QKV, "rank": 8, "slices": ["q", "v"]}], HEAD),
    "dora": ("DoRA (q, v, r 8)", [{"name": "dora", "kind": "dora", "at": QKV, "rank": 8, "slices": ["q", "v"]}], HEAD),
    "loha": ("LoHa (qkv, r 4)", [{"name": "loha", "kind": "loha", "at": QKV, "rank": 4}], HEAD),
    "lokr": ("LoKr (every Linear, r 8)", [{"name": "lokr", "kind": "lokr", "at": LINEARS, "rank": 8}], HEAD),
    "oft": ("OFT (every Linear, b 16)", [{"name": "oft", "kind": "oft", "at": LINEARS, "block_size": 16}], HEAD),
    "boft": (
        "BOFT (every Linear, b 8, m 2)",
        [{"name": "boft", "kind": "boft", "at": LINEARS, "block_size": 8, "butterfly_factor": 2}],
        HEAD,
    ),
    "vera": (
        "VeRA (q, v, r 256)",
        [{"name": "vera", "kind": "vera", "at": QKV, "rank": 256, "slices": ["q", "v"]}],
        HEAD,
    ),
    "glora": ("GLoRA (every Linear, r 4)", [{"name": "glora", "kind": "glora", "at": LINEARS, "rank": 4}], HEAD),
    "convpass": (
        "Convpass",
        [
            {"name": n, "kind": "convpass", "at": f"blocks.*.{n}", "dim": 8, "conv_init": "xavier"}
            for n in ("attn", "mlp")
        ],
        HEAD,
    ),
    "repadapter": (
        "RepAdapter",
        [{"name": "rep", "kind": "repadapter", "at": ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"], "dim": 8}],
        HEAD,
    ),
    "fact_tt": (
        "FacT-TT (r 8)",
        [{"name": "fact", "kind": "fact", "at": {"path": "blocks.*.**", "type": "Linear"}}],
        HEAD,
    ),
    "fact_tk": (
        "FacT-TK (r 16)",
        [{"name": "fact", "kind": "fact", "form": "tk", "rank": 16, "at": {"path": "blocks.*.**", "type": "Linear"}}],
        HEAD,
    ),
    "difffit": (
        "DiffFit",
        [{"name": "gamma", "kind": "ia3", "at": {"path": ATTN_FFN, "layers": "0-2"}}],
        ["**.bias", {"type": "LayerNorm"}, "head"],
    ),
    "ln_tune": ("LN-Tune", [], [{"type": "LayerNorm"}, "head"]),
    "adapter_plus": (
        "Adapter+",
        [
            {"name": "adapter", "kind": "adapter", "at": "blocks.*", "placement": "sequential", "dim": 8}
            | {"scale": "channel", "init": "houlsby", "drop_path": 0.1}
        ],
        HEAD,
    ),  # fmt: skip
    "vqt": ("VQT (T 1)", [{"name": "vqt", "kind": "vqt", "at": "blocks.*", "length": 1}], []),
    "noah": (
        "NOAH subnet",
        [
            {
                "name": "prompt",
                "kind": "prompt",
                "at": "blocks.*",
                "placement": "concat",
                "length": [10, 5, 10, 1, 5, 1],
            },
            *(
                {"name": f"lora_r{r}", "kind": "lora", "at": {"path": "blocks.*.attn.qkv", "layers": ls}, "rank": r}
                for r, ls in ((10, "0,5"), (5, "2,3"), (1, "1,4"))
            ),
            *(
                {
                    "name": f"adapter_d{d}",
                    "kind": "adapter",
                    "at": {"path": "blocks.*.mlp", "layers": ls},
                    "dim": d,
                    "placement": "sequential",
                    "act": "quick_gelu",
                    "scale": "none",
                    "init": "xavier",
                }
                for d, ls in ((10, "1-3"), (5, "0,4"), (1, "5"))
            ),
        ],
        HEAD,
    ),  # fmt: skip
}


def spec_for(key: str) -> dict[str, Any]:
    """The quickstart's LoRA spec with this method's tuners and trainable parameters instead."""
    import yaml

    data = yaml.safe_load(BASE_SPEC.read_text())
    data["model"]["pretrained"] = str((BASE_SPEC.parent / data["model"]["pretrained"]).resolve())
    _, rules, trainable = METHODS[key]
    data["tuners"], data["trainable"] = rules, trainable
    return data


def run(key: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """build -> train -> eval (-> merge, re-score the plain model) for one method."""
    import utune
    from utune.runs import eval_run, train_run

    t0 = time.perf_counter()
    built = utune.build(spec_for(key), overrides, verify=True)
    summary = train_run(built, out / key, resume=False)
    acc = eval_run(out / key, split="test", which="latest")["acc"]
    row: dict[str, Any] = {
        "key": key,
        "method": METHODS[key][0],
        "test_acc": acc,
        "trainable_params": built.report["trainable_params"],
        "train_time_s": summary["time_s"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if all(t["mergeable"] for t in built.report["tuners"]):
        row.update(merged(out / key))
    return row


def merged(run_dir: Path) -> dict[str, Any]:
    """``utune export --merge`` of the run, then the plain timm model scored on the same test split."""
    import torch
    from safetensors.torch import load_file

    from utune.export import export
    from utune.models import create_model, data_config
    from utune.runs import build_loaders, load_run
    from utune.train.loop import evaluate

    built = load_run(run_dir)
    path = run_dir / "merged.safetensors"
    check = export(built, "merge", path, force=True).get("verify")
    m = built.spec.model
    plain = create_model(m.name, pretrained=False, num_classes=m.num_classes, kwargs=dict(m.kwargs))
    plain.load_state_dict(load_file(str(path)), strict=True)
    loaders = build_loaders(built.spec.data, data_config(plain), built.spec.train, splits=("test",))
    acc = float(evaluate(plain, loaders["test"], torch.device("cpu"))["acc"])
    return {"merged_max_abs_diff": getattr(check, "max_abs_diff", None), "merged_plain_test_acc": acc}


def markdown(rows: list[dict[str, Any]], machine: str, overrides: list[str]) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "The quickstart backbone (ViT, C = 96, 6 blocks, pre-trained on six Fashion-MNIST classes) tuned on "
        "scikit-learn's digits, 10 epochs, AdamW lr 1e-2, seed 0"
        + (f", overrides {' '.join(overrides)}" if overrides else "")
        + "; one lr (the quickstart LoRA's), not tuned per method; test = the 360 held-out digits.",
        "",
        "| method | test acc | trainable | merged: plain timm model's test acc (max diff) | train s |",
        "|---|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | |")
            continue
        merge = (
            f"{100 * r['merged_plain_test_acc']:.2f} % ({r['merged_max_abs_diff']:.2g})"
            if "merged_plain_test_acc" in r
            else "does not merge"
        )
        lines.append(
            f"| {r['method']} | {100 * r['test_acc']:.2f} % | {r['trainable_params']:,} | {merge} | "
            f"{r['train_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    p.add_argument("--name", default="zoo_digits", help="file stem of the results")
    p.add_argument("overrides", nargs="*", help="key.path=value for every method, e.g. train.epochs=2")
    args = p.parse_args(argv)
    import torch

    from bench.machine import describe_machine, write_results

    torch.set_num_threads(1)  # as the quickstart: tiny batches, a second thread mostly waits
    machine = describe_machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.methods.split(","):
            try:
                rows.append(run(key, Path(tmp), list(args.overrides)))
            except Exception as e:  # a failed method is recorded, the others still run
                rows.append({"key": key, "method": METHODS[key][0], "error": f"{type(e).__name__}: {e}"})
            print(rows[-1], flush=True)
    md = markdown(rows, machine["summary"], list(args.overrides))
    write_results(args.out, args.name, {"machine": machine, "overrides": args.overrides, "rows": rows}, md)
    print(md)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference cost of a merged export vs the plain backbone, and of the unmerged tuned model.

A merged model *is* the plain architecture with other weights, so it should run at the plain model's speed;
the unmerged tuned model pays for its extra branches. For each spec the script builds the tuned model, sets
its tuners to non-trivial values (random; speed does not depend on them), merges and verifies the export,
and times eval-mode forwards of plain / tuned / merged models. The models are timed round-robin (one
forward of each per round, the order rotating between rounds) so that load on a shared machine drifts
over all of them alike; the median of the
timed rounds is reported. Results: ``bench/results/merge_<model>_cpu.{json,md}``.

    .venv/bin/python bench/bench_merge.py                  # vit_base_patch16_224, batch 8, 224 px
    .venv/bin/python bench/bench_merge.py --iters 3 --model vit_tiny_patch16_224   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe_machine, write_results  # noqa: E402
from utune.engine.build import build  # noqa: E402
from utune.export import merged_state_dict, verify_merged  # noqa: E402

RESULTS = Path(__file__).parent / "results"

SPECS: dict[str, list[dict[str, Any]]] = {
    # LoRA as in the paper's ViT setting: rank 8 on the q and v thirds of every fused qkv
    "lora_qv_r8": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 8, "slices": ["q", "v"]}],
    # SSF after every Linear and LayerNorm of every block (the SSF paper's placement)
    "ssf_all": [
        {"name": "ssf_lin", "kind": "ssf", "at": ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc*"]},
        {"name": "ssf_norm", "kind": "ssf", "at": ["blocks.*.norm1", "blocks.*.norm2"]},
    ],
}


def machine() -> dict[str, Any]:
    info = describe_machine("cpu")
    info["timm"] = timm.__version__
    return info


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Give every tuner parameter a non-trivial value (LoRA B starts at zero, scales at one)."""
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.startswith("utune."):
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def time_round_robin(models: dict[str, nn.Module], x: torch.Tensor, warmup: int, iters: int) -> dict[str, Any]:
    for m in models.values():
        m.eval()
    for _ in range(warmup):
        for m in models.values():
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for i in range(iters):
        for k in names[i % len(names) :] + names[: i % len(names)]:  # rotate: no model always runs first
            t0 = time.perf_counter()
            models[k](x)
            times[k].append(time.perf_counter() - t0)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "all_s": [round(t, 4) for t in v]}
        for k, v in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--specs", nargs="*", default=list(SPECS))
    args = ap.parse_args()

    torch.manual_seed(0)
    info = machine()
    x = torch.randn(args.batch, 3, args.img, args.img)
    plain = timm.create_model(args.model, pretrained=False, num_classes=100)
    base_state = plain.state_dict()
    traced = build({"version": 1, "model": {"name": args.model, "num_classes": 100}})  # fx, no tuners
    traced.base.load_state_dict(base_state)
    rows: list[dict[str, Any]] = []
    for name in args.specs:
        spec = {"version": 1, "model": {"name": args.model, "num_classes": 100}, "tuners": SPECS[name],
                "trainable": ["head"]}  # fmt: skip
        t0 = time.perf_counter()
        built = build(spec)
        built.base.load_state_dict(base_state)  # the same weights as the plain model (shared with built.model)
        perturb(built.model)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged_state = merged_state_dict(built).state
        merge_s = time.perf_counter() - t0
        check = verify_merged(built, merged_state)
        merged = timm.create_model(args.model, pretrained=False, num_classes=100)
        merged.load_state_dict(merged_state, strict=True)
        with torch.no_grad():
            effect = float((built.model.eval()(x[:2]) - plain.eval()(x[:2])).abs().max())
        models = {"plain": plain, "traced": traced.model, "tuned": built.model, "merged": merged}
        timing = time_round_robin(models, x, args.warmup, args.iters)
        p = timing["plain"]["median_s"]
        rows.append(
            {
                "spec": name,
                "tuner_params": built.report["tuner_params"],
                "build_s": round(build_s, 2),
                "merge_s": round(merge_s, 3),
                "verify_max_abs_diff": check.max_abs_diff,
                "verify_ok": check.ok,
                "tuned_vs_plain_max_abs_diff": effect,
                "timing": timing,
                "traced_vs_plain_pct": round(100 * (timing["traced"]["median_s"] / p - 1), 1),
                "tuned_overhead_pct": round(100 * (timing["tuned"]["median_s"] / p - 1), 1),
                "merged_vs_plain_pct": round(100 * (timing["merged"]["median_s"] / p - 1), 1),
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "timing"}), flush=True)
        del built, merged
    result = {
        "benchmark": "merge",
        "model": args.model,
        "batch": args.batch,
        "img": args.img,
        "warmup": args.warmup,
        "iters": args.iters,
        "machine": info,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    stem = f"merge_{args.model}_cpu"
    write_results(RESULTS, stem, result, markdown(result))
    print(f"wrote {RESULTS / stem}.json and .md")


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# Merged vs plain vs tuned inference: {r['model']}",
        "",
        f"CPU, eval mode, batch {r['batch']}, {r['img']} px; {r['warmup']} warm-up + {r['iters']} timed rounds, "
        "models timed round-robin in rotating order, median. Run on "
        f"{r['date']}.",
        "",
        f"Machine: {m['summary']}; timm {m['timm']}; load average {r['load_average_at_end'][0]:.1f} at the end "
        "(a shared machine: absolute times are noisy, compare within a row).",
        "",
        "| spec | tuner params | plain (s) | fx-traced, no tuners (s) | tuned (s) | merged (s) | tuned vs plain "
        "| merged vs plain | merge (s) | max abs diff merged/tuned | tuned/plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        t = row["timing"]
        lines.append(
            f"| {row['spec']} | {row['tuner_params']:,} | {t['plain']['median_s']:.3f} | {t['traced']['median_s']:.3f} "
            f"| {t['tuned']['median_s']:.3f} | {t['merged']['median_s']:.3f} | {row['tuned_overhead_pct']:+.1f}% "
            f"| {row['merged_vs_plain_pct']:+.1f}% | {row['merge_s']:.2f} | {row['verify_max_abs_diff']:.2g} "
            f"| {row['tuned_vs_plain_max_abs_diff']:.2g} |"
        )
    lines += [
        "",
        "The merged model is the plain architecture with other weights: the same speed is expected, and any "
        "difference in the merged column is measurement noise. The tuned model runs its tuners as extra "
        "branches (LoRA: two small matmuls per layer, plus a zero block and a concat for the frozen k third "
        "with slices; SSF: an elementwise scale-and-shift per op); the fx-traced column is the same graph "
        "without tuners, separating the cost of the traced module itself. `max abs diff merged/tuned` is the "
        "export's verification; `tuned/plain` shows the (random, non-trivial) tuners do change the output.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

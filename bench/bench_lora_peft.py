"""utune's LoRA against Hugging Face PEFT's LoRA on the same timm model, steps interleaved in one process.

Both models share the same initial weights (rank 8 on every fused ``qkv``, alpha 8, head trainable).
Each round times one AdamW training step of each model in alternating order, so a change in machine
load hits both alike; the headline is the ratio of medians (utune / PEFT; <= 1 means utune is as fast).

    python bench/bench_lora_peft.py --model vit_base_patch16_224 --batch 8 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.machine import describe_machine, write_results  # noqa: E402


def build_pair(model_name: str, img_size: int, num_classes: int) -> tuple[Any, Any]:
    import timm
    import torch
    from peft import LoraConfig, get_peft_model

    from utune.api import build

    spec = {
        "version": 1,
        "model": {
            "name": model_name,
            "num_classes": num_classes,
            "img_size": img_size,
            "kwargs": {"img_size": img_size},
        },
        "tuners": [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 8, "alpha": 8}],
        "trainable": ["head"],
    }
    ours = build(spec).model
    base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    base.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("utune.")}, strict=False)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
    torch.manual_seed(0)
    return ours, peft_model


def step_fn(model: Any, x: Any, y: Any) -> Any:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    import torch

    machine = describe_machine("cpu")
    ours, theirs = build_pair(args.model, args.img_size, 100)
    ours.train()
    theirs.train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch,))
    steps = {"utune": step_fn(ours, x, y), "peft": step_fn(theirs, x, y)}
    times: dict[str, list[float]] = {"utune": [], "peft": []}
    for r in range(args.warmup + args.rounds):
        order = ["utune", "peft"] if r % 2 == 0 else ["peft", "utune"]
        for name in order:
            dt = steps[name]()
            if r >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    counts = {
        "utune": sum(q.numel() for q in ours.parameters() if q.requires_grad),
        "peft": sum(q.numel() for q in theirs.parameters() if q.requires_grad),
    }
    result = {
        "kind": "lora_vs_peft",
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "rounds": args.rounds,
        "median_step_s": med,
        "trainable_params": counts,
        "utune_over_peft": med["utune"] / med["peft"],
        "all_step_s": times,
    }
    md = (
        f"Machine: {machine['summary']}\n\n`{args.model}`, batch {args.batch}, {args.img_size} px, CPU; LoRA r=8 "
        f"on every qkv + head; {args.rounds} interleaved rounds after {args.warmup} warm-up, median.\n\n"
        "| | trainable | median step (s) |\n|---|---:|---:|\n"
        f"| utune | {counts['utune']:,} | {med['utune']:.3f} |\n| PEFT | {counts['peft']:,} | {med['peft']:.3f} |\n\n"
        f"utune / PEFT step time: **{result['utune_over_peft']:.3f}**\n"
    )
    stem = args.name or f"lora_vs_peft_{args.model}_b{args.batch}_cpu"
    write_results(args.out, stem, {"machine": machine, **result}, md)
    print(md)


if __name__ == "__main__":
    main()

"""utune's LoRA against Hugging Face PEFT's LoRA on the same timm model, steps interleaved in one process.

Arms (all from the same initial weights, rank 8, alpha 8, head trainable, AdamW):

- ``utune``: utune's LoRA, by default as in ``specs/vit_b16_cifar100/lora.yaml`` (``slices: [q, v]`` on the
  fused ``qkv``: two rank-8 pairs; ``--slices none`` for one pair on the whole ``qkv``);
- ``utune_before``: the same modules run by the forward utune had before issue 15 (a matmul per slice and
  per factor, a zero tensor for the k third, a concatenation, a multiply by the scaling): before/after in
  one run;
- ``peft``: PEFT's LoRA on the whole fused ``qkv`` (rank 8: the same parameter count);
- ``floor``: no LoRA at all, but ``pos_embed`` trainable, so autograd runs the same backward through every
  frozen block: what any LoRA step costs at least. ``peft - floor`` is LoRA's own share of PEFT's step.

Each round times one training step of each arm in an order that alternates, so a change in machine load
hits all alike; the headline is the ratio of medians (utune / PEFT; <= 1 means utune is as fast).

    python bench/bench_lora_peft.py --model vit_base_patch16_224 --batch 8 --rounds 10
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

ARMS = ("utune", "utune_before", "peft", "floor")
# wall-clock seconds, or this process's CPU seconds (--cpu-time: on a machine shared with other jobs, the CPU
# time a step takes varies far less than its wall time; with --threads 1 it is the step's work)
CLOCK = {"wall": True}


def _spec(model_name: str, img_size: int, num_classes: int, slices: list[str] | None) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 8, "alpha": 8}
    if slices:
        rule["slices"] = slices
    return {
        "version": 1,
        "model": {
            "name": model_name,
            "num_classes": num_classes,
            "img_size": img_size,
            "kwargs": {"img_size": img_size},
        },
        "tuners": [rule],
        "trainable": ["head"],
    }


def _before(m: Any, x: Any) -> Any:
    """utune's LoRA forward before issue 15, kept here to measure against."""
    import torch

    from utune.tuners.lora import SLICES

    if m.dropout is not None:
        x = m.dropout(x)
    if m.slices is None:
        y = m.branch(x)
        return y if m.scaling == 1.0 else y * m.scaling
    parts, zero = [], None
    for s in SLICES:
        if s in m.branches:
            parts.append(m.slice(s)(x) * m.scaling)
        else:
            if zero is None:
                zero = x.new_zeros(*x.shape[:-1], m.part)
            parts.append(zero)
    return torch.cat(parts, dim=-1)


def build_arms(model_name: str, img_size: int, num_classes: int, slices: list[str] | None) -> dict[str, Any]:
    import copy

    import timm
    import torch
    from peft import LoraConfig, get_peft_model

    from utune.engine.build import build
    from utune.tuners.lora import Lora

    ours = build(_spec(model_name, img_size, num_classes, slices)).model
    before = copy.deepcopy(ours)
    for m in before.modules():
        if isinstance(m, Lora):
            m.forward = _before.__get__(m)  # the old forward on this copy only
    frozen = {k: v for k, v in ours.state_dict().items() if not k.startswith("utune.")}
    base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    base.load_state_dict(frozen, strict=False)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
    floor = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    floor.load_state_dict(frozen, strict=False)
    for name, p in floor.named_parameters():
        p.requires_grad_(name.startswith("head") or name == "pos_embed")
    torch.manual_seed(0)
    return {"utune": ours, "utune_before": before, "peft": peft_model, "floor": floor}


def step_fn(model: Any, x: Any, y: Any) -> Any:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        t = time.perf_counter() if CLOCK["wall"] else time.process_time()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (time.perf_counter() if CLOCK["wall"] else time.process_time()) - t

    return step


def summarize(times: dict[str, list[float]], counts: dict[str, int], slices: list[str] | None) -> dict[str, Any]:
    """Medians, and the median over rounds of each arm's step over PEFT's step *in the same round* (paired:
    robust to load that changes between rounds, which a shared machine has)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(a / b for a, b in zip(v, times["peft"], strict=True)) for k, v in times.items()}
    return {
        "kind": "lora_vs_peft",
        "utune_slices": slices,
        "median_step_s": med,
        "paired_over_peft": paired,
        "trainable_params": counts,
        "utune_over_peft": paired["utune"],
        "utune_before_over_peft": paired["utune_before"],
        "floor_over_peft": paired["floor"],
        "all_step_s": times,
    }


def to_markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    slices, med, counts, paired = (
        result[k] for k in ("utune_slices", "median_step_s", "trainable_params", "paired_over_peft")
    )
    what = f"slices {','.join(slices)} of qkv" if slices else "the whole qkv"
    rows = {
        "utune": f"utune, {what}",
        "utune_before": f"utune before issue 15, {what}",
        "peft": "PEFT, the whole qkv",
        "floor": "floor: no LoRA, same backward (pos_embed trainable)",
    }
    return (
        f"Machine: {machine['summary']}\n\n`{result['model']}`, batch {result['batch']}, {result['img_size']} px, "
        f"CPU ({machine['torch_threads']} torch threads; step times in {result.get('clock', 'wall')} seconds); "
        f"LoRA r=8 (alpha 8) + head; {result['rounds']} interleaved "
        f"rounds after {result['warmup']} warm-up. \"vs PEFT\": median over rounds of the arm's step / PEFT's step "
        "in the same round.\n\n| arm | trainable | median step (s) | vs PEFT |\n|---|---:|---:|---:|\n"
        + "".join(f"| {rows[k]} | {counts[k]:,} | {med[k]:.3f} | {paired[k]:.3f} |\n" for k in ARMS)
        + f"\nutune / PEFT step time: **{paired['utune']:.3f}** (before: {paired['utune_before']:.3f}); the floor "
        f"(no LoRA compute at all) is {paired['floor']:.3f} of PEFT's step.\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slices", default="q,v", help="utune's slices on qkv (lora.yaml: q,v); none: the whole qkv")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time steps in process CPU seconds, not wall seconds")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None)
    p.add_argument("--render", type=Path, default=None, help="rewrite the .md of a recorded .json and exit")
    args = p.parse_args()
    if args.render:
        import json

        data = json.loads(args.render.read_text())
        data |= summarize(data["all_step_s"], data["trainable_params"], data["utune_slices"])
        write_results(args.render.parent, args.render.stem, data, to_markdown(data, data["machine"]))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK["wall"] = not args.cpu_time
    slices = None if args.slices == "none" else args.slices.split(",")
    machine = describe_machine("cpu")
    models = build_arms(args.model, args.img_size, 100, slices)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch,))
    for m in models.values():
        m.train()
    with torch.no_grad():  # the arms compute the same function (B = 0 at init: all equal the base)
        ref = models["peft"](x)
        same = {k: float((m(x) - ref).abs().max()) for k, m in models.items()}
    steps = {k: step_fn(m, x, y) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in ARMS}
    for r in range(args.warmup + args.rounds):
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        for name in order:
            dt = steps[name]()
            if r >= args.warmup:
                times[name].append(dt)
    counts = {k: sum(q.numel() for q in m.parameters() if q.requires_grad) for k, m in models.items()}
    result = summarize(times, counts, slices)
    result |= {"model": args.model, "batch": args.batch, "img_size": args.img_size, "rounds": args.rounds}
    result |= {"warmup": args.warmup, "max_abs_diff_at_init": same, "clock": "wall" if CLOCK["wall"] else "cpu"}
    md = to_markdown(result, machine)
    stem = args.name or f"lora_vs_peft_{args.model}_b{args.batch}_cpu"
    write_results(args.out, stem, {"machine": machine, **result}, md)
    print(md)


if __name__ == "__main__":
    main()

"""Step time, throughput and peak memory of PETL methods on one model, batch and device, in one run.

Each method runs in its own subprocess (so peak memory is its own); full fine-tuning, measured in the
same run, is the baseline of the ratio columns, which are the headline figures. Memory: CUDA max
allocated on GPU, peak RSS of the process on CPU (with the RSS after building the model beside it).

    python bench/bench_methods.py --model vit_tiny_patch16_224 --batch 8 --steps 5
    python bench/bench_methods.py --model vit_base_patch16_224 --batch 32 --methods full,utuning_dual,bypass
    python bench/bench_methods.py --apply-scaling     # trace + rewrite time from ViT-Ti to ViT-L
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.machine import describe_machine, peak_rss_mb, rss_mb, write_results  # noqa: E402
from bench.methods import METHODS, PEFT_METHODS, spec_for  # noqa: E402


def _peft_model(model_name: str, img_size: int, num_classes: int) -> tuple[Any, dict[str, Any]]:
    import timm
    from peft import LoraConfig, get_peft_model

    base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
    model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, {"trainable_params": trainable, "total_params": total}


def run_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one method's model, then time ``steps`` AdamW steps on random data (after ``warmup``)."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    if METHODS.get(method, {}).get("release_freed_memory"):
        from utune.train.memory import release_freed_memory

        release_freed_memory()  # what train.release_freed_memory does at the start of training
    if method in PEFT_METHODS:
        model, counts = _peft_model(args.model, args.img_size, 100)
    else:
        from utune.engine.build import build

        built = build(spec_for(method, args.model, args.img_size))
        model = built.model
        counts = {"trainable_params": built.report["trainable_params"], "total_params": built.report["total_params"]}
    model.to(device).train()
    rss_built = rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    saved: dict[int, int] = {}  # storage -> bytes kept for backward (first step), for the memory split
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), _saved(model, saved, i):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    result = {
        "method": method,
        **counts,
        "trainable_pct": 100 * counts["trainable_params"] / counts["total_params"],
        "step_s": step,
        "images_per_s": args.batch / step,
        "rss_after_build_mb": rss_built,
        "peak_rss_mb": peak_rss_mb(),
        **_split(model, saved, params),
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


@contextlib.contextmanager
def _saved(model: Any, seen: dict[int, int], step: int) -> Iterator[None]:
    """On the first step, record the storages autograd keeps for backward (and the inputs a checkpointed
    module keeps instead of its activations)."""
    import torch

    if step != 0:
        yield
        return

    def note(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t: Any) -> Any:
        note(t)
        return t

    hooks = [
        m.register_forward_pre_hook(lambda _m, args: [note(a) for a in args] and None)
        for m in model.modules()
        if getattr(m, "checkpoint", False) is True
    ]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    for h in hooks:
        h.remove()


def _split(model: Any, saved: dict[int, int], params: list[Any]) -> dict[str, float]:
    """Memory by part, MB: frozen + trainable weights, what the optimizer adds (grads + AdamW's two moments),
    what the forward keeps for backward (the side network's inputs for a bypass)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(p.numel() * p.element_size() for p in params)
    return {
        "weights_mb": weights / 2**20,
        "grads_optimizer_mb": 3 * trainable / 2**20,
        "saved_for_backward_mb": sum(saved.values()) / 2**20,
    }


def _subprocess(argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def methods_table(args: argparse.Namespace) -> dict[str, Any]:
    names = list(METHODS) + list(PEFT_METHODS) if args.methods == "all" else args.methods.split(",")
    common = [
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--img-size",
        str(args.img_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
    ]
    rows = []
    for name in names:
        if name in PEFT_METHODS:
            try:
                import peft  # noqa: F401
            except ImportError:
                rows.append({"method": name, "error": "peft is not installed (pip install 'utune[peft]')"})
                continue
        print(f"  {name} ...", file=sys.stderr, flush=True)
        rows.append({"method": name, **_subprocess(["--one", name, *common])})
    found = {r["method"]: r for r in rows if "error" not in r}
    mem_key = "cuda_max_allocated_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    for r in rows:
        # a *_release method (train.release_freed_memory) against full fine-tuning with the same allocator
        base = found.get("full_release") if r["method"].endswith("_release") else found.get("full")
        if base and "error" not in r:
            r["step_vs_full"] = r["step_s"] / base["step_s"]
            r["memory_vs_full"] = r[mem_key] / base[mem_key]
    return {
        "kind": "methods",
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory_metric": mem_key,
        "rows": rows,
    }


def apply_scaling(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for model in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"):
        print(f"  {model} ...", file=sys.stderr, flush=True)
        rows.append(_subprocess(["--one-apply", model]))
    return {"kind": "apply_scaling", "spec": "utuning_dual", "rows": rows}


def run_one_apply(model: str) -> dict[str, Any]:
    from utune.engine.build import build

    built = build(spec_for("utuning_dual", model, 224))
    t = built.report["timings"]
    return {
        "model": model,
        "total_params": built.report["total_params"],
        "nodes": len(built.model.graph.nodes),
        **t,
        "trace_plus_rewrite_s": t["trace_s"] + t["rewrite_s"],
    }


def to_markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [f"Machine: {machine['summary']}", ""]
    if result["kind"] == "methods":
        mem = result["memory_metric"]
        lines += [
            f"`{result['model']}`, batch {result['batch']}, {result['img_size']} px, {result['device']}, "
            f"median of {result['steps']} steps after {result['warmup']} warm-up (AdamW step included).",
            "",
            f"| method | trainable | % | step (s) | images/s | {mem} | step vs full | memory vs full | weights MB | "
            "grads + AdamW MB | kept for backward MB | rest (forward transients, allocator) MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['error']} | | | | | | |")
                continue
            lines.append(
                f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} | {r['step_s']:.3f} | "
                f"{r['images_per_s']:.1f} | {r[mem]:.0f} | {r.get('step_vs_full', float('nan')):.2f} | "
                f"{r.get('memory_vs_full', float('nan')):.2f} | {_mb(r, 'weights_mb')} | "
                f"{_mb(r, 'grads_optimizer_mb')} | {_mb(r, 'saved_for_backward_mb')} | {_rest(r, mem)} |"
            )
    else:
        lines += [
            "Build of the U-Tuning dual spec (pretrained: false), seconds:",
            "",
            "| model | params | graph nodes | create (weight init) | trace + shapes | rewrite | trace + rewrite |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["rows"]:
            if "error" in r:
                lines.append(f"| ? | {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['total_params']:,} | {r['nodes']} | {r['create_s']:.2f} | "
                f"{r['trace_s']:.2f} | {r['rewrite_s']:.2f} | {r['trace_plus_rewrite_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _mb(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.0f}" if key in row else ""


def _rest(row: dict[str, Any], mem: str) -> str:
    """The peak less the weights, the optimizer's part and the kept activations (and, on CPU, less the
    process before the weights: Python, torch's libraries)."""
    if "weights_mb" not in row:
        return ""
    base = row["rss_after_build_mb"] - row["weights_mb"] if mem == "peak_rss_mb" else 0.0
    parts = row["weights_mb"] + row["grads_optimizer_mb"] + row["saved_for_backward_mb"]
    return f"{row[mem] - base - parts:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="all", help="comma-separated, or all")
    p.add_argument("--apply-scaling", action="store_true")
    p.add_argument("--name", default=None, help="results file stem (default from model/batch/device)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-apply", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    if args.one_apply:
        print(json.dumps(run_one_apply(args.one_apply)))
        return
    machine = describe_machine(args.device)
    result = apply_scaling(args) if args.apply_scaling else methods_table(args)
    stem = args.name or (
        "apply_scaling"
        if args.apply_scaling
        else f"methods_{args.model}_b{args.batch}_{args.img_size}px_{args.device.split(':')[0]}"
    )
    md = to_markdown(result, machine)
    write_results(args.out, stem, {"machine": machine, **result}, md)
    print(md)


if __name__ == "__main__":
    main()

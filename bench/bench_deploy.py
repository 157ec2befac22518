"""What a deployed tuned model costs: torch eager against onnxruntime, on the CPU, per method.

For each method on one ViT-S-sized backbone (timm's ``vit_small_patch16_224``: 22 M parameters, 224 px) the
script builds the tuned model, gives every tuner non-trivial values, exports it with
:func:`utune.export.deploy.export_deployed` (both formats; each verified against the tuned model), then
times eval-mode forwards: batch-1 latency and batch-32 throughput, torch eager (the artifact's own module:
the plain model with merged weights, or the tuned graph) against onnxruntime running the ``.onnx`` file.
``lora (unfolded)`` exports the same LoRA without folding it: the cost of not folding. All rows in one run,
round-robin over the models so that load drifts over all alike; one torch / onnxruntime thread each.

    python bench/bench_deploy.py --cpu-time                       # vit_small_patch16_224, all methods
    python bench/bench_deploy.py --model test_vit --img-size 32   # a seconds-long check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe_machine, write_results  # noqa: E402
from bench.methods import spec_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = {  # row -> (bench/methods.py method, fold)
    "plain": ("linear", True),
    "lora (merged)": ("lora", True),
    "lora (unfolded)": ("lora", False),
    "U-Tuning dual": ("utuning_dual", True),
    "VPT-Deep": ("vpt_deep", True),
    "bypass": ("bypass", True),
}
CLOCK = {"fn": time.perf_counter}


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def median_time(fn: Callable[[], Any], iters: int) -> float:
    times = []
    for _ in range(iters):
        t = CLOCK["fn"]()
        fn()
        times.append(CLOCK["fn"]() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="the throughput batch")
    p.add_argument("--latency-iters", type=int, default=10, help="batch-1 forwards per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows of the table")
    p.add_argument("--cpu-time", action="store_true", help="process CPU seconds (steadier on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    import onnxruntime as ort

    from utune.engine.build import build
    from utune.export.deploy import deployable, export_deployed

    torch.set_num_threads(1)
    if args.cpu_time:
        CLOCK["fn"] = time.process_time
    machine = describe_machine("cpu")
    machine["onnxruntime"] = ort.__version__
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    rows = [m.strip() for m in args.methods.split(",")]
    runners: dict[str, dict[str, Callable[[torch.Tensor], Any]]] = {}
    info: dict[str, dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    for row in rows:
        method, fold = METHODS[row]
        torch.manual_seed(0)
        built = build(spec_for(method, args.model, args.img_size))
        perturb(built.model)
        t = time.perf_counter()
        summary = export_deployed(built, "onnx", tmp / f"{len(info)}.onnx", fold=fold)
        onnx_s = time.perf_counter() - t
        module = deployable(built, fold=fold).module.eval()
        sess = ort.InferenceSession(str(tmp / f"{len(info)}.onnx"), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        runners[row] = {
            "torch": lambda x, m=module: m(x),
            "onnxruntime": lambda x, s=sess, n=name: s.run(None, {n: x.numpy()}),
        }
        info[row] = {
            "method": method,
            "folded": summary["folded"],
            "kept": summary["kept"],
            "onnx_bytes": summary["bytes"],
            "onnx_export_s": onnx_s,
            "verify_max_abs_diff": summary["verify"].max_abs_diff,
            "trainable": sum(q.numel() for q in built.model.parameters() if q.requires_grad),
        }
        print(f"{row}: exported in {onnx_s:.1f} s, {summary['verify'].line()}", flush=True)
    x1 = torch.randn(1, 3, args.img_size, args.img_size)
    xb = torch.randn(args.batch, 3, args.img_size, args.img_size)
    times: dict[str, list[float]] = {f"{r}|{e}|{w}": [] for r in rows for e in ("torch", "onnxruntime") for w in "lb"}
    with torch.no_grad():
        for r in rows:  # warm-up
            for fn in runners[r].values():
                fn(x1), fn(xb)
        for rnd in range(args.rounds):
            order = rows if rnd % 2 == 0 else list(reversed(rows))
            for r in order:
                for engine, fn in runners[r].items():
                    times[f"{r}|{engine}|l"].append(median_time(lambda f=fn: f(x1), args.latency_iters))
                    times[f"{r}|{engine}|b"].append(median_time(lambda f=fn: f(xb), 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        table[r] = {
            "torch_latency_ms": med[f"{r}|torch|l"] * 1e3,
            "onnxruntime_latency_ms": med[f"{r}|onnxruntime|l"] * 1e3,
            "torch_img_s": args.batch / med[f"{r}|torch|b"],
            "onnxruntime_img_s": args.batch / med[f"{r}|onnxruntime|b"],
        }
    base = table.get("plain")
    lines = [
        f"Machine: {machine['summary']}; onnxruntime {machine['onnxruntime']}\n",
        f"`{args.model}`, {args.img_size} px, CPU, 1 thread (torch and onnxruntime), eval mode; median of "
        f"{args.rounds} rounds (latency: the median of {args.latency_iters} batch-1 forwards a round; throughput: "
        f"one batch of {args.batch} a round), {'CPU' if args.cpu_time else 'wall'} seconds, models round-robin. "
        "The ONNX file of each row is `utune export --onnx` of it (verified against the tuned model before "
        "timing); torch runs the same module the export was made from.\n",
        "| method | in the graph | torch b1 (ms) | onnxruntime b1 (ms) | torch b32 (img/s) | onnxruntime b32 "
        "(img/s) | b1 vs plain (ort) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = table[r]
        graph = "merged weights" if info[r]["folded"] else ("tuners" if info[r]["kept"] else "-")
        rel = f"{t['onnxruntime_latency_ms'] / base['onnxruntime_latency_ms']:.2f}" if base else "-"
        lines.append(
            f"| {r} | {graph} | {t['torch_latency_ms']:.1f} | {t['onnxruntime_latency_ms']:.1f} | "
            f"{t['torch_img_s']:.1f} | {t['onnxruntime_img_s']:.1f} | {rel} |"
        )
    md = "\n".join(lines) + "\n"
    result = {"kind": "deploy", "model": args.model, "img_size": args.img_size, "batch": args.batch}
    result.update(rounds=args.rounds, clock="cpu" if args.cpu_time else "wall", table=table, info=info, all_s=times)
    stem = args.name or f"deploy_{args.model}_{args.img_size}px_cpu"
    write_results(args.out, stem, {"machine": machine, **result}, md)
    print(md)


if __name__ == "__main__":
    main()

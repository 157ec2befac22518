"""One command for the GPU numbers: images/s, peak memory and MFU of five methods, torch.compile off and on.

    bash bench/gpu.sh                     # ViT-B/16, 224 px, batch 128, bf16 autocast, on cuda
    python bench/bench_gpu.py --device cpu --model test_vit --img-size 32 --batch 2 --steps 1 --warmup 1 \\
        --compile-backend aot_eager --peak-tflops 0.1 --in-process   # the same rows on a CPU, tiny (the test)

Rows: full fine-tuning, linear probing, LoRA (qkv, r 8), U-Tuning dual, Res-Tuning-Bypass (``bench/methods.py``),
each eager and compiled, each in its own subprocess (peak memory is the row's own). A row times the
Trainer's optimizer (``utune.train.optim``) on one random batch: ``warmup`` steps first (the first one of a
compiled model is its compilation, reported as ``compile_s``), then the median of ``steps`` steps.

FLOPs (the convention): ``forward_gflops`` is torch's ``FlopCounterMode`` over one eager forward of the
batch (matmuls, convolutions and attention; a multiply-add is 2 FLOPs), per image. ``train_gflops`` is the
same counter over one forward + backward, so it is what the method really computes: 3x forward for full
fine-tuning (input and weight gradients), about 2x for a frozen backbone with tuners inside it (input
gradients only, weight gradients for the tuners alone), about 1x for linear probing (nothing flows into
the backbone). ``mfu`` = train FLOPs per step / step time / the device's peak bf16 dense FLOP/s
(``--peak-tflops``, else known GPUs: H100/H200 989, A100 312); the optimizer's FLOPs are not counted.
Results: ``bench/results/gpu_<model>_b<batch>_<size>px_<device>.{json,md}`` with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.machine import describe_machine, peak_rss_mb, write_results  # noqa: E402
from bench.methods import spec_for  # noqa: E402

METHODS = ("full", "linear", "lora", "utuning_dual", "bypass")
# bf16 dense tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device: Any, override: float | None) -> float | None:
    import torch

    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_flops(model: Any, x: Any, y: Any, backward: bool) -> int:
    """FLOPs of one forward (and backward) of ``model`` on ``x``, as FlopCounterMode counts them."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return int(counter.get_total_flops())


def run_row(method: str, compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``method``'s model and time its training steps; one row of the table."""
    import torch
    import torch.nn.functional as F

    from utune.engine.build import build
    from utune.spec.sections import TrainConfig
    from utune.train.optim import build_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    built = build(spec_for(method, args.model, args.img_size))
    model = built.model.to(device).train()
    cfg = TrainConfig(lr=1e-4, device=args.device)
    optimizer = build_optimizer(model, cfg, device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    fwd = count_flops(model, x, y, backward=False)
    train = count_flops(model, x, y, backward=True)
    step_model = torch.compile(model, backend=args.compile_backend) if compiled else model
    cuda = device.type == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = step_model(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    warm = [step() for _ in range(args.warmup)]
    times = [step() for _ in range(args.steps)]
    step_s = statistics.median(times)
    peak = peak_tflops(device, args.peak_tflops)
    row: dict[str, Any] = {
        "method": method,
        "compile": compiled,
        "trainable_params": built.report["trainable_params"],
        "total_params": built.report["total_params"],
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "first_step_s": warm[0] if warm else None,
        # the compile step less one ordinary step; for eager rows, the first step's extra cost (warm-up)
        "compile_s": max(warm[0] - step_s, 0.0) if warm else None,
        "forward_gflops_per_image": fwd / args.batch / 1e9,
        "train_gflops_per_image": train / args.batch / 1e9,
        "train_over_forward": train / fwd if fwd else None,
        "mfu": train / step_s / (peak * 1e12) if peak else None,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb(),
        "memory_kind": "cuda max allocated" if cuda else "peak RSS of the process",
    }
    return row


def _child(method: str, compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--row", f"{method}:{int(compiled)}", *_common(args)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "compile": compiled, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _common(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--img-size", str(args.img_size), "--batch", str(args.batch)]
    out += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    out += ["--compile-backend", args.compile_backend]
    return out + ([] if args.peak_tflops is None else ["--peak-tflops", str(args.peak_tflops)])


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(data: dict[str, Any]) -> str:
    a = data["args"]
    lines = [
        f"Machine: {data['machine']['summary']}, {data['load_average_end']:.1f} at the end",
        "",
        f"{a['model']}, batch {a['batch']}, {a['img_size']} px, "
        f"{'bf16 autocast' if a['device'].startswith('cuda') else 'fp32'} on {data['device_name']}; "
        f"median of {a['steps']} steps after {a['warmup']} warm-up; compile backend {a['compile_backend']}; "
        f"peak {_fmt(data['peak_tflops'], '.1f')} TFLOP/s. FLOPs: FlopCounterMode, training = forward + backward "
        "as counted (see bench/bench_gpu.py).",
        "",
        "| method | compile | trainable | images/s | step ms | compile s | fwd GFLOPs/img | train/fwd | MFU | "
        "peak memory MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {'on' if r['compile'] else 'off'} | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['method']} | {'on' if r['compile'] else 'off'} | {r['trainable_params']:,} | "
            f"{r['images_per_s']:.1f} | {1000 * r['step_s']:.1f} | {_fmt(r['compile_s'], '.1f')} | "
            f"{r['forward_gflops_per_image']:.3g} | {_fmt(r['train_over_forward'], '.2f')} | "
            f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'%' if r['mfu'] is not None else ''} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1: the compile step)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--compile", default="off,on", help="off | on | off,on")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: known GPUs)")
    p.add_argument("--in-process", action="store_true", help="all rows in this process (CPU memory then shared)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None, help="file stem (default: gpu_<model>_b<batch>_<size>px_<device>)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row is not None:
        method, compiled = args.row.split(":")
        print(json.dumps(run_row(method, compiled == "1", args)))
        return

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu (and tiny sizes) to check the script")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    modes = [{"off": False, "on": True}[m] for m in args.compile.split(",")]
    rows = []
    for method in args.methods.split(","):
        for compiled in modes:
            row = run_row(method, compiled, args) if args.in_process else _child(method, compiled, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    data = {
        "machine": describe_machine(args.device),
        "load_average_end": os.getloadavg()[0],  # other jobs on a shared machine: compare within one run
        "device_name": device_name,
        "peak_tflops": peak_tflops(device, args.peak_tflops),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "row"},
        "rows": rows,
    }
    stem = args.name or f"gpu_{args.model}_b{args.batch}_{args.img_size}px_{slug}"
    write_results(args.out, stem, data, markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()

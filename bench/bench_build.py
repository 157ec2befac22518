"""How long ``utune.build`` and ``utune inspect`` take, against ``timm.create_model`` and against the old path.

Build: for each spec, one process times (after imports) ``timm.create_model`` of the spec's model (a real
init, the floor the old build could not go under), ``utune.build`` from a local weights file and from random
init (``model.pretrained: false``), and the same two builds through the old path (``utune._reference``:
real creation, train + eval traces, shapes by real forwards). The variants run round-robin, the order
rotating between rounds, so load on a shared machine drifts over all of them alike; the median of the
rounds is reported. Each spec's fast and old builds are then checked equal: every tensor of the tuned model
and its output on a random batch, bit for bit.

Inspect: each model is inspected in a fresh subprocess (imports not timed), started through a small
launcher that reports the subprocess's peak RSS (``getrusage(RUSAGE_CHILDREN)``); a subprocess that only
imports gives the floor. The old path (a real model, real forwards) runs once for ``--old-inspect``'s models.

    python bench/bench_build.py                                  # ViT-B/16, ViT-L/14, Swin-B; ViT-H, ViT-g
    python bench/bench_build.py --cases vit_b16 --repeats 3 --inspect vit_huge_patch14_224   # a quick check

Results: ``bench/results/build_cpu.{json,md}`` (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine, write_results  # noqa: E402

# case -> (spec file, overrides); the model is built at the spec's own size and class count
CASES: dict[str, tuple[str, list[str]]] = {
    "vit_b16": ("specs/vit_b16_cifar100/utuning_dual.yaml", []),  # U-Tuning dual adapters, ViT-B/16
    "vit_l14": ("specs/vit_l14_clip_cifar100/utuning_dual.yaml", []),  # the same on CLIP ViT-L/14
    "swin_b": ("specs/swin_t_cifar100/lora_adapter.yaml", ["model.name=swin_base_patch4_window7_224.ms_in22k"]),
    "tiny": ("specs/vit_b16_cifar100/utuning_dual.yaml", ["model.name=test_vit", "model.img_size=32"]),  # tests
}
INSPECT = ["vit_huge_patch14_224", "vit_giant_patch14_224"]
VARIANTS = [
    "timm.create_model",
    "build (file)",
    "build (random init)",
    "build (file, other head)",  # a checkpoint for 1000 classes: the 100-class head keeps its random init
    "old build (file)",
    "old build (random init)",
]


def _spec(case: str) -> tuple[Any, list[str]]:
    from utune.spec import load_spec

    path, overrides = CASES[case]
    return load_spec(ROOT / path, overrides), overrides


def _weights(spec: Any, folder: Path, num_classes: int | None = None) -> Path:
    """A weights file for the spec's model at its class count or ``num_classes`` (random values: speed does
    not depend on them)."""
    import torch
    from safetensors.torch import save_file

    from utune.models import create_model

    m = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        classes = num_classes or m.num_classes
        model = create_model(m.name, num_classes=classes, kwargs=dict(m.kwargs), img_size=m.img_size)
    path = folder / f"weights_{classes}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of ``fn()``. On a machine whose cores other jobs
    share, the CPU time is the steadier of the two (a descheduled thread costs wall time, not CPU time)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    del out
    return seconds, cpu


def bench_case(case: str, repeats: int, folder: Path) -> dict[str, Any]:
    import timm

    from utune._reference import reference
    from utune.engine.build import build

    spec, overrides = _spec(case)
    path = str(ROOT / CASES[case][0])
    m = spec.model
    weights = _weights(spec, folder)
    file_ov = [*overrides, f"model.pretrained={weights}"]
    other_ov = [*overrides, f"model.pretrained={_weights(spec, folder, 1000 if m.num_classes != 1000 else 10)}"]
    random_ov = [*overrides, "model.pretrained=false"]
    size = {"img_size": m.img_size} if m.img_size is not None else {}

    def old(ov: list[str]) -> Any:
        with reference():
            return build(path, ov)

    runs: dict[str, Callable[[], Any]] = {
        "timm.create_model": lambda: timm.create_model(m.name, num_classes=m.num_classes, **dict(m.kwargs), **size),
        "build (file)": lambda: build(path, file_ov),
        "build (random init)": lambda: build(path, random_ov),
        "build (file, other head)": lambda: build(path, other_ov),
        "old build (file)": lambda: old(file_ov),
        "old build (random init)": lambda: old(random_ov),
    }
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for k in order:
            wall, used = _timed(runs[k])
            times[k].append(wall)
            cpu[k].append(used)
    phases = build(path, file_ov).report["timings"]
    same = {
        "file": _same(build(path, file_ov), old(file_ov)),
        "random init": _same(build(path, random_ov), old(random_ov)),
    }
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": case,
        "spec": CASES[case][0],
        "overrides": overrides,
        "model": m.name,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "fast_file_phases_s": phases,
        "speedup_file": round(med["old build (file)"] / med["build (file)"], 2),
        "build_file_vs_create_model": round(med["build (file)"] / med["timm.create_model"], 2),
        "bit_identical": same,
    }


def _same(fast: Any, old: Any) -> bool:
    import torch

    a, b = fast.model.state_dict(), old.model.state_dict()
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        return False
    x = torch.randn(1, *fast.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bool(torch.equal(fast.model.eval()(x), old.model.eval()(x)))


_LAUNCHER = (
    "import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:], "
    "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def _child(args: list[str]) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh process; its JSON line and its peak RSS."""
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, str(Path(__file__).resolve()), *args]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res['err']}")
    out = json.loads(res["out"].strip().splitlines()[-1])
    out["peak_rss_mb"] = round(res["peak_rss_mb"], 1)
    return out


def child_main(what: str, model: str, old: bool) -> None:
    import timm  # noqa: F401  (imports are not timed)

    from utune._reference import reference
    from utune.engine.build import inspect

    if what == "imports":
        print(json.dumps({"seconds": 0.0}))
        return
    t = time.perf_counter()
    if old:
        with reference():
            rows = inspect(model)
    else:
        rows = inspect(model)
    print(json.dumps({"seconds": round(time.perf_counter() - t, 3), "sites": len(rows)}))


def bench_inspect(models: list[str], repeats: int, old: list[str]) -> dict[str, Any]:
    floor = _child(["--child", "imports"])["peak_rss_mb"]
    rows = []
    for model in models:
        runs = [_child(["--child", "inspect", model]) for _ in range(repeats)]
        row = {
            "model": model,
            "sites": runs[0]["sites"],
            "median_s": round(statistics.median(r["seconds"] for r in runs), 3),
            "all_s": [r["seconds"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_rss_over_imports_mb": round(max(r["peak_rss_mb"] for r in runs) - floor, 1),
        }
        if model in old:
            before = _child(["--child", "inspect", model, "--old"])
            row["old_s"], row["old_peak_rss_mb"] = before["seconds"], before["peak_rss_mb"]
        rows.append(row)
    return {"imports_peak_rss_mb": floor, "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Build and inspect speed",
        "",
        f"Machine: {data['machine']['summary']}; load average {data['load_average_end']:.1f} at the end (a shared "
        "machine: compare within a row).",
        "",
        f"Command: `{data['command']}`",
        "",
        f"## Build (seconds after imports, median of {data['repeats']}, variants round-robin)",
        "",
        "| case | model | " + " | ".join(VARIANTS) + " | old/new (file) | bit-identical (file, random) |",
        "|---|---|" + "---:|" * len(VARIANTS) + "---:|---|",
    ]
    for r in data["build"]:
        same = f"{r['bit_identical']['file']}, {r['bit_identical']['random init']}"
        cells = " | ".join(f"{r['median_s'][k]:.3f}" for k in VARIANTS)
        lines.append(f"| {r['case']} | {r['model']} | {cells} | {r['speedup_file']}x | {same} |")
    lines += ["", "CPU seconds (this process, all threads; the steadier figure on a shared machine), median:", ""]
    lines += ["| case | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    lines += [
        f"| {r['case']} | " + " | ".join(f"{r['median_cpu_s'][k]:.3f}" for k in VARIANTS) + " |" for r in data["build"]
    ]
    lines += ["", "Phases of the fast build from a file (s): "]
    lines += [f"- {r['case']}: {r['fast_file_phases_s']}" for r in data["build"]]
    if data.get("inspect"):
        ins = data["inspect"]
        lines += [
            "",
            f"## Inspect (a fresh process each; seconds after imports, median of {data['repeats']})",
            "",
            f"A process that only imports torch, timm and utune peaks at {ins['imports_peak_rss_mb']} MB RSS.",
            "",
            "| model | sites | seconds | peak RSS (MB) | over imports (MB) | old: seconds | old: peak RSS (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ins["rows"]:
            lines.append(
                f"| {r['model']} | {r['sites']} | {r['median_s']} | {r['peak_rss_mb']} | "
                f"{r['peak_rss_over_imports_mb']} | {r.get('old_s', '-')} | {r.get('old_peak_rss_mb', '-')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="vit_b16,vit_l14,swin_b", help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--inspect", default=",".join(INSPECT), help="comma-separated timm names ('' for none)")
    p.add_argument(
        "--old-inspect", default=INSPECT[0], help="models also inspected once the old way (slow, GBs; '' for none)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="build_cpu")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1] if len(args.child) > 1 else "", args.old)
        return
    import timm

    machine = describe_machine("cpu")
    machine["timm"] = timm.__version__
    data: dict[str, Any] = {"machine": machine, "repeats": args.repeats, "command": " ".join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory() as tmp:
        data["build"] = []
        for case in [c for c in args.cases.split(",") if c]:
            data["build"].append(bench_case(case, args.repeats, Path(tmp)))
            print(json.dumps(data["build"][-1]["median_s"]), case, flush=True)
    models = [m for m in args.inspect.split(",") if m]
    old = [m for m in args.old_inspect.split(",") if m]
    data["inspect"] = bench_inspect(models, args.repeats, old) if models else None
    data["load_average_end"] = os.getloadavg()[0]
    write_results(args.out, args.name, data, markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()

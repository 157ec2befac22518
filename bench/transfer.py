"""An offline three-task transfer benchmark in the spirit of VTAB-1k, built with ``utune compare``.

    python bench/transfer.py                      # every method, 3 tasks, 3 seeds (about 40 min on 2 cores)
    python bench/transfer.py --methods linear,lora,utuning_dual --tasks heldout --seeds 2

Backbone: ``quickstart/vit_fmnist6.safetensors``, a 28 px ViT that utune pre-trained on six Fashion-MNIST
classes (``quickstart/pretrain.yaml``; 93.72 % on their 6,000 test images). Tasks, 1,000 training images
each (class-stratified, fixed by ``data.split_seed``), scored on the full test split:

- ``heldout``: the four classes the backbone never saw (pullover, coat, shirt, ankle boot); 4,000 test images;
- ``digits``: scikit-learn's 8x8 handwritten digits, upscaled (domain shift); 360 test images;
- ``rotation``: which of 0/90/180/270 degrees a held-out-class image was turned by (structured); 4,000 test.

Every method (``bench/transfer/specs/``) chooses its learning rate from 0.3x, 1x and 3x its spec's value on a
validation split of 200 of the 1,000 training images, then trains on all 1,000 with seeds 0, 1, 2. Runs are
resumable and reused (``--runs``); results go to ``bench/results/transfer_cpu.{json,md}`` and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python bench/transfer.py` from the repository root

from bench.machine import describe_machine  # noqa: E402
from bench.transfer_report import markdown, plot  # noqa: E402

SPECS = HERE / "transfer" / "specs"
HELDOUT = "data.classes=[2,4,6,9]"
TASKS: dict[str, tuple[str, list[str]]] = {
    "heldout": ("held-out Fashion-MNIST classes", ["data.dataset=fashion-mnist", HELDOUT, "data.task=classify"]),
    "digits": ("digits (domain shift)", ["data.dataset=digits", "data.classes=null", "data.task=classify"]),
    "rotation": ("rotation of held-out-class images", ["data.dataset=fashion-mnist", HELDOUT, "data.task=rotation"]),
}
METHODS = [
    "linear",
    "full",
    "bitfit",
    "vpt_shallow",
    "vpt_deep",
    "adapter",
    "adaptformer",
    "lora",
    "prefix",
    "ssf",
    "ia3",
    "utuning_single",
    "utuning_dual",
    "utuning_tri",
    "restuning_dual",
    "restuning_bypass",
]
# the method zoo (specs/README.md), scaled to this backbone: `--methods zoo` (or zoo,linear,lora for anchors)
ZOO = sorted(p.stem for p in SPECS.glob("zoo_*.yaml"))
LR_GRID = {"train.lr": ["0.3x", "1x", "3x"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated spec names in bench/transfer/specs; zoo: the zoo's",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of: {', '.join(TASKS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each its own process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-transfer"), help="run folders (reused)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the results go")
    p.add_argument("--name", default="transfer_cpu", help="file stem of the results")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. train.epochs=2)")
    return p.parse_args(argv)


class _Progress:
    """One line per run on stderr, with the task."""

    def __init__(self, task: str) -> None:
        self.task = task

    def planned(self, total: int, reused: int) -> None:
        print(f"[{self.task}] {total} runs ({reused} selection runs reused)", file=sys.stderr, flush=True)

    def started(self, index: int, total: int, task: Any, eta_s: float | None) -> None:
        eta = f", ~{eta_s / 60:.1f} min left in this task" if eta_s is not None else ""
        print(
            f"[{self.task}] run {index}/{total}: {task.method} {task.kind} {task.point or ''} seed {task.seed}{eta}",
            file=sys.stderr,
            flush=True,
        )

    def finished(self, index: int, total: int, task: Any, result: dict[str, Any]) -> None:
        what = result.get("error") or f"{result['split']} acc {100 * result['acc']:.2f}%"
        print(f"[{self.task}] done {index}/{total}: {task.method} {task.kind}: {what}", file=sys.stderr, flush=True)


def run_task(key: str, args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    from utune.compare import Method, compare

    load0, t0 = os.getloadavg(), time.perf_counter()
    doc = compare(
        [Method(SPECS / f"{m}.yaml", name=m) for m in methods],
        out=args.runs / key,
        seeds=args.seeds,
        grid=LR_GRID,
        overrides=[*TASKS[key][1], *args.overrides],
        jobs=args.jobs,
        threads=args.threads,
        reporter=_Progress(key),
    )
    doc.update(task=key, title=TASKS[key][0], wall_s=round(time.perf_counter() - t0, 1))
    doc["load_avg"] = {"start": [round(v, 2) for v in load0], "end": [round(v, 2) for v in os.getloadavg()]}
    return doc


def _keep_timings(docs: list[dict[str, Any]], previous: Path) -> float | None:
    """A task whose runs were all reused keeps the time and load averages of the run that trained them
    (from the previous result file); returns the total then, when every task was reused, else None."""
    try:
        old = {t["task"]: t for t in json.loads(previous.read_text())["tasks"]}
    except (OSError, ValueError, KeyError):
        return None
    kept = 0
    for doc in docs:
        if doc["runs"]["reused"] == doc["runs"]["total"] and doc["task"] in old:
            doc.update(wall_s=old[doc["task"]]["wall_s"], load_avg=old[doc["task"]]["load_avg"], timing="kept")
            kept += 1
    return round(sum(d["wall_s"] for d in docs), 1) if kept == len(docs) else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [z for m in args.methods.split(",") if m.strip() for z in (ZOO if m.strip() == "zoo" else [m.strip()])]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [m for m in methods if not (SPECS / f"{m}.yaml").is_file()] + [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"error: unknown method or task: {', '.join(unknown)}", file=sys.stderr)
        return 2
    os.environ.setdefault("UTUNE_QUIET", "1")
    import torch

    torch.set_num_threads(args.threads)  # what each run gets (this process itself only plans and collects)
    machine = describe_machine("cpu")
    threads = f"({args.threads} torch threads)"
    machine["summary"] = machine["summary"].replace(
        threads, f"({args.threads} torch thread a run, {args.jobs} at a time)"
    )
    t0 = time.perf_counter()
    docs = [run_task(key, args, methods) for key in tasks]
    trained_s = _keep_timings(docs, args.out / f"{args.name}.json")
    result = {
        "benchmark": "transfer",
        "machine": machine,
        "settings": {
            "seeds": args.seeds,
            "jobs": args.jobs,
            "threads": args.threads,
            "lr_grid": LR_GRID,
            "overrides": args.overrides,
            "methods": methods,
        },
        "wall_s": round(time.perf_counter() - t0, 1) if trained_s is None else trained_s,
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "tasks": docs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, args.out / f"{args.name}.png")
    (args.out / f"{args.name}.md").write_text(markdown(result, f"{args.name}.png"))
    print((args.out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""K Res-Tuning-Bypass tasks on one backbone (``utune.build_sets``): one shared backbone pass against K.

Timed in one process, interleaved over rounds (median): inference ``forward_sets`` of K sets, one set's
forward, K separate forwards; training ``train_step`` of K tasks (one backbone pass, a loss per task summed)
against one task's step (the same ``train_step`` with one target). Headline: K tasks / one task.

Tasks from different datasets (``utune multitask``) share no images: a step concatenates K batches and
runs the backbone once on all K x B rows, each task's side network and head on its own B rows
(``train_step(..., rows=...)``). Its backbone work is K batches' by necessity, so it is timed against K
separate one-task steps (what K runs of their own do per step), not against one.

    python bench/bench_sets.py --model vit_base_patch16_224 --batch 4 --k 4 --rounds 3

``--codegen``: ``forward_sets`` as generated code (:mod:`utune.engine.sets_code`) against the per-node
``fx.Interpreter`` it replaced and against a plain forward of one tuned model, inference, interleaved:

    python bench/bench_sets.py --codegen --model test_vit --img-size 32 --batch 2 --k 4 --repeat 200 --cpu-time
    python bench/bench_sets.py --codegen --model vit_base_patch16_224 --batch 4 --k 4 --repeat 1 --cpu-time
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.machine import describe_machine, write_results  # noqa: E402
from bench.methods import spec_for  # noqa: E402

CLOCK = {"fn": time.perf_counter}  # or time.process_time (--cpu-time: steadier on a shared machine)


def _timed(fn: Callable[[], Any]) -> float:
    t = CLOCK["fn"]()
    fn()
    return CLOCK["fn"]() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time in process CPU seconds, not wall seconds")
    p.add_argument("--codegen", action="store_true", help="generated forward_sets vs the interpreter (inference)")
    p.add_argument("--kind", default="bypass", help="--codegen: the method of every set (bench/methods.py)")
    p.add_argument("--repeat", type=int, default=1, help="--codegen: calls per timed sample (tiny models)")
    args = p.parse_args()
    if args.codegen:
        codegen(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK["fn"] = time.process_time

    import utune

    machine = describe_machine("cpu")
    names = [f"task{i}" for i in range(args.k)]
    sets = utune.build_sets({n: spec_for("bypass", args.model, args.img_size) for n in names})
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    targets = {n: torch.randint(0, 100, (args.batch,)) for n in names}
    xk = torch.randn(args.k * args.batch, 3, args.img_size, args.img_size)  # K tasks' own images
    rows = {n: slice(i * args.batch, (i + 1) * args.batch) for i, n in enumerate(names)}
    opt = torch.optim.AdamW([q for q in sets.parameters() if q.requires_grad], lr=1e-4)

    def separate() -> None:
        for n in names:
            sets.set_active(n)
            sets(x)

    with torch.no_grad():
        infer = {
            "forward_sets_k": lambda: sets.forward_sets(x, names),
            "forward_one": lambda: sets.forward_sets(x, names[:1]),
            "separate_k": separate,
        }
        times: dict[str, list[float]] = {k: [] for k in (*infer, "train_k", "train_one", "train_rows_k", "train_sep_k")}
        sets.eval()
        for r in range(args.warmup + args.rounds):
            for k, fn in infer.items():
                dt = _timed(fn)
                if r >= args.warmup:
                    times[k].append(dt)
    sets.train()
    train = {
        "train_k": lambda: sets.train_step(x, targets, opt),
        "train_one": lambda: sets.train_step(x, {names[0]: targets[names[0]]}, opt),
        "train_rows_k": lambda: sets.train_step(xk, targets, opt, rows=rows),
        "train_sep_k": lambda: [sets.train_step(xk[rows[n]], {n: targets[n]}, opt) for n in names],
    }
    for r in range(args.warmup + args.rounds):
        order = list(train) if r % 2 == 0 else list(reversed(train))
        for k in order:
            dt = _timed(train[k])
            if r >= args.warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "kind": "bypass_sets",
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "k": args.k,
        "rounds": args.rounds,
        "clock": "cpu" if args.cpu_time else "wall",
        "median_s": med,
        "forward_sets_over_one": med["forward_sets_k"] / med["forward_one"],
        "separate_over_one": med["separate_k"] / med["forward_one"],
        "train_k_over_one": med["train_k"] / med["train_one"],
        "train_rows_k_over_one": med["train_rows_k"] / med["train_one"],
        "train_rows_k_over_separate": med["train_rows_k"] / med["train_sep_k"],
        "all_s": times,
    }
    k = args.k
    md = (
        f"Machine: {machine['summary']}\n\n`{args.model}`, batch {args.batch}, {args.img_size} px, CPU; {k} "
        f"Res-Tuning-Bypass sets (L = 10, 100-class heads) on one backbone; median of {args.rounds} rounds after "
        f"{args.warmup} warm-up, {result['clock']} seconds.\n\n| what | median (s) | vs one task |\n|---|---:|---:|\n"
        f"| inference, one set | {med['forward_one']:.3f} | 1.00 |\n"
        f"| inference, `forward_sets` of {k} sets (one backbone pass) | {med['forward_sets_k']:.3f} | "
        f"{result['forward_sets_over_one']:.2f} |\n"
        f"| inference, {k} separate forwards | {med['separate_k']:.3f} | {result['separate_over_one']:.2f} |\n"
        f"| training step, one task | {med['train_one']:.3f} | 1.00 |\n"
        f"| training step, {k} tasks (`train_step`: one backbone pass, losses summed) | {med['train_k']:.3f} | "
        f"**{result['train_k_over_one']:.2f}** |\n"
        f"| training step, {k} tasks from different datasets ({k} x {args.batch} rows, one backbone pass, each "
        f"side network on its rows) | {med['train_rows_k']:.3f} | {result['train_rows_k_over_one']:.2f} "
        f"(**{result['train_rows_k_over_separate']:.2f}x** {k} separate steps) |\n"
        f"| {k} separate one-task steps on those {k} batches | {med['train_sep_k']:.3f} | "
        f"{med['train_sep_k'] / med['train_one']:.2f} |\n"
    )
    stem = args.name or f"bypass_sets_{args.model}_k{k}_b{args.batch}_cpu"
    write_results(args.out, stem, {"machine": machine, **result}, md)
    print(md)


def codegen(args: argparse.Namespace) -> None:
    """One set and K sets through the generated forward_sets, the old interpreter, and plain forwards."""
    import torch

    import utune
    from utune.engine.sets import _SharedRun

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK["fn"] = time.process_time
    machine = describe_machine("cpu")
    names = [f"task{i}" for i in range(args.k)]
    sets = utune.build_sets({n: spec_for(args.kind, args.model, args.img_size) for n in names}).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    one = sets.sets[names[0]]

    def interpreted(ns: list[str]) -> dict[str, Any]:
        cache: dict[str, Any] = {}
        return {n: _SharedRun(sets.sets[n], cache).run(x) for n in ns}

    def repeated(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.repeat):
                fn()

        return run

    cases = {
        "plain_one": repeated(lambda: one(x)),  # the tuned model's own forward (its GraphModule code)
        "generated_one": repeated(lambda: sets.forward_sets(x, names[:1])),
        "interpreted_one": repeated(lambda: interpreted(names[:1])),
        "generated_k": repeated(lambda: sets.forward_sets(x, names)),
        "interpreted_k": repeated(lambda: interpreted(names)),
        "plain_k": repeated(lambda: [sets.sets[n](x) for n in names]),  # K separate forwards
    }
    with torch.no_grad():
        for n in names:  # the results first: bit for bit
            assert torch.equal(sets.forward_sets(x, names)[n], interpreted(names)[n])
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(args.warmup + args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for k in order:
                dt = _timed(cases[k]) / args.repeat
                if r >= args.warmup:
                    times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "kind": "sets_codegen",
        "method": args.kind,
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "k": args.k,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "clock": "cpu" if args.cpu_time else "wall",
        "median_s": med,
        "generated_one_over_plain": med["generated_one"] / med["plain_one"],
        "interpreted_one_over_plain": med["interpreted_one"] / med["plain_one"],
        "generated_k_over_interpreted_k": med["generated_k"] / med["interpreted_k"],
        "all_s": times,
    }
    k, ms = args.k, 1e3
    md = (
        f"Machine: {machine['summary']}\n\n`{args.model}`, batch {args.batch}, {args.img_size} px, CPU, inference; "
        f"{k} `{args.kind}` sets on one backbone, the same images; median of {args.rounds} rounds of {args.repeat} "
        f"call(s) after {args.warmup} warm-up, {result['clock']} seconds, interleaved.\n\n"
        f"| what | median (ms) | ratio |\n|---|---:|---:|\n"
        f"| one tuned model's own forward | {med['plain_one'] * ms:.3f} | 1.00 |\n"
        f"| `forward_sets`, one set, generated code | {med['generated_one'] * ms:.3f} | "
        f"**{result['generated_one_over_plain']:.3f}** x plain |\n"
        f"| `forward_sets`, one set, the old interpreter | {med['interpreted_one'] * ms:.3f} | "
        f"{result['interpreted_one_over_plain']:.2f} x plain |\n"
        f"| `forward_sets`, {k} sets, generated code | {med['generated_k'] * ms:.3f} | "
        f"**{result['generated_k_over_interpreted_k']:.3f}** x interpreter |\n"
        f"| `forward_sets`, {k} sets, the old interpreter | {med['interpreted_k'] * ms:.3f} | 1.00 |\n"
        f"| {k} separate forwards | {med['plain_k'] * ms:.3f} | {med['plain_k'] / med['interpreted_k']:.2f} x "
        "interpreter |\n"
    )
    stem = args.name or f"sets_codegen_{args.kind}_{args.model}_k{k}_b{args.batch}_cpu"
    write_results(args.out, stem, {"machine": machine, **result}, md)
    print(md)


if __name__ == "__main__":
    main()

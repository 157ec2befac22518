"""``utune compare SPEC...``: methods compared on one dataset (a thin layer over :func:`utune.compare.compare`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from utune import _output as out
from utune.cli._common import DataDir, Dataset, Format, data_overrides, set_format, spec_file
from utune.errors import UserInputError


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_cmd)


class CompareProgress:
    """One line per run on stderr: which run of how many, and the estimated time left."""

    def __init__(self) -> None:
        self.enabled = not out.quiet()
        self.t0 = time.perf_counter()

    def planned(self, total: int, reused: int) -> None:
        if self.enabled:
            done = f" ({reused} selection runs already done, reused)" if reused else ""
            out.note(f"compare: {total} runs planned{done}")

    def started(self, index: int, total: int, task: Any, eta_s: float | None) -> None:
        if self.enabled:
            left = f", about {_duration(eta_s)} left" if eta_s is not None else ""
            out.note(f"run {index}/{total}: {task.method} {_what(task)}{left}")

    def finished(self, index: int, total: int, task: Any, result: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if "error" in result:
            out.warn(f"run {index}/{total}: {task.method} {_what(task)} failed: {result['error']}")
        elif result.get("reused"):
            out.note(f"run {index}/{total}: {task.method} {_what(task)}: reused ({_score(result)})")
        else:
            out.note(f"run {index}/{total}: {task.method} {_what(task)}: {_score(result)} in {result['wall_s']:.0f} s")


def _what(task: Any) -> str:
    if task.kind == "select":
        return "select " + ", ".join(f"{k}={v}" for k, v in task.point.items())
    return f"seed {task.seed}"


def _score(result: Mapping[str, Any]) -> str:
    return f"{result['split']} acc {100 * result['acc']:.2f}%"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Spec files, then ``key=value`` overrides (an argument with ``=`` that is not a file)."""
    specs = [a for a in args if "=" not in a or Path(a).exists()]
    overrides = [a for a in args if a not in specs]
    if not specs:
        raise UserInputError("no spec given", hint="utune compare SPEC [SPEC...] --dataset digits")
    return specs, overrides


def compare_cmd(
    specs: Annotated[
        list[str], typer.Argument(help="spec files or built-in names (one per method), then key=value overrides")
    ],
    dataset: Dataset = None,
    data_dir: DataDir = None,
    seeds: Annotated[int, typer.Option("--seeds", help="final runs per method (seeds 0..N-1)")] = 3,
    lr_grid: Annotated[
        str | None,
        typer.Option(
            "--lr-grid", help="learning rates to choose from, e.g. 1e-3,1e-2 or 0.3x,1x,3x (times the spec's)"
        ),
    ] = None,
    grid: Annotated[
        list[str] | None, typer.Option("--grid", help="another knob to choose, e.g. tuners.0.dim=4,8 (repeatable)")
    ] = None,
    val_size: Annotated[
        float, typer.Option("--val-size", help="validation split carved from training data: a fraction or a count")
    ] = 0.2,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="where the runs live (default: runs/compare-<dataset>); reused")
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="runs at once, each in its own process")] = 1,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads per run (default: torch's)")] = None,
    fmt: Format = "table",
) -> None:
    """Compare methods on one dataset: learning rate (and other knobs) chosen on a validation split carved
    from the training data, then several seeds scored on the test split, with 95 % confidence intervals."""
    set_format(fmt)
    from utune.compare import Method, compare, parse_grid
    from utune.compare.table import COLUMNS, caption, rows

    files, ov = _split_args(specs)
    files = [str(spec_file(f)) for f in files]  # a file here, else a built-in spec's name
    ov += data_overrides(dataset, data_dir)
    values = parse_grid(grid or [], lr_grid)
    if val_size <= 0:
        raise UserInputError(f"--val-size must be positive, got {val_size}", hint="a fraction such as 0.2, or a count")
    size: int | float = int(val_size) if val_size >= 1 and float(val_size).is_integer() else val_size
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    target = out_dir or Path("runs") / f"compare-{dataset or Path(files[0]).stem}"
    doc = compare(
        [Method(f) for f in files],
        out=target,
        seeds=seeds,
        grid=values,
        overrides=ov,
        val_size=size,
        jobs=jobs,
        threads=threads,
        reporter=CompareProgress(),
    )
    if fmt == "json":
        out.print_json(doc)
        return
    out.table(caption(doc), COLUMNS, rows(doc), {c: "right" for c in COLUMNS[1:4]})
    out.info(f"{target}/compare.json, compare.md, " + ", ".join(Path(p).name for p in doc["plots"].values()))

"""``utune multitask SPEC...``: several tasks trained on one backbone pass (a thin layer over
:func:`utune.runs.multitask.train_sets`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from utune import _output as out
from utune.cli._common import Format, set_format, spec_file
from utune.errors import UserInputError


def register(app: typer.Typer) -> None:
    app.command("multitask")(multitask_cmd)


def parse_tasks(args: list[str]) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """``SPEC`` (named by its file stem) or ``NAME=SPEC`` per task, then ``key=value`` overrides for every
    task and ``NAME:key=value`` for one. Returns the tasks and each task's overrides."""
    from utune.spec.catalog import is_builtin_name

    tasks: dict[str, Path] = {}
    common: list[str] = []
    own: list[tuple[str, str]] = []
    for a in args:
        name, _, path = a.partition("=")
        if Path(a).is_file() or "=" not in a:  # a file, else a built-in's name (an error names the closest)
            path = str(spec_file(a))
            name = Path(path).stem
        elif path and "." not in name and ":" not in name and not Path(path).is_file() and is_builtin_name(path):
            path = str(spec_file(path))  # NAME=BUILTIN (an override's key has a dot: section.key=value)
        elif not (path and Path(path).is_file()):
            task, colon, override = a.partition(":")
            if colon and "=" not in task:
                own.append((task, override))
            else:
                common.append(a)
            continue
        if name in tasks:
            raise UserInputError(
                f"two tasks are named {name!r}", hint=f"name them: utune multitask {name}1={tasks[name]} {name}2={path}"
            )
        tasks[name] = Path(path)
    if not tasks:
        raise UserInputError("no spec given", hint="utune multitask A.yaml B.yaml (one spec per task)")
    overrides = {name: list(common) for name in tasks}
    for task, override in own:
        if task not in overrides:
            raise UserInputError(
                f"no task named {task!r} (in {task}:{override})", hint=f"the tasks: {', '.join(tasks)}"
            )
        overrides[task].append(override)
    return tasks, overrides


class _Progress:
    def __init__(self) -> None:
        self.enabled = not out.quiet()

    def __call__(self, step: int, total: int, losses: Mapping[str, float]) -> None:
        if self.enabled:
            out.note(f"step {step}/{total}: loss " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))


def multitask_cmd(
    specs: Annotated[
        list[str],
        typer.Argument(help="one spec per task (SPEC or NAME=SPEC), then key=value (every task), NAME:key=value"),
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="the run folder (default: runs/multitask-<time>); a folder per task")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="training steps (default: the longest task's epochs x steps)")
    ] = None,
    fmt: Format = "table",
) -> None:
    """Train several tasks (each its own spec and dataset) on one backbone: every step concatenates one
    batch per task, runs what no task's tuners reach once, and each task's tuners and head on its own rows."""
    set_format(fmt)
    tasks, overrides = parse_tasks(specs)  # before torch is imported: a typo answers at once
    if steps is not None and steps < 1:
        raise UserInputError(
            f"--steps must be at least 1, got {steps}", hint="leave it out to train for the specs' epochs"
        )
    from utune.runs import default_run_dir
    from utune.runs.multitask import train_sets
    from utune.spec import load_spec

    target = out_dir or default_run_dir("multitask")
    sources = {name: load_spec(path, overrides[name]) for name, path in tasks.items()}
    doc = train_sets(sources, target, steps=steps, progress=_Progress())
    if fmt == "json":
        out.print_json(doc)
        return
    rows = [_row(name, t) for name, t in doc["tasks"].items()]
    out.table(
        f"{len(rows)} tasks, {doc['steps']} steps, {doc['step_s']:.3f} s a step",
        ["task", "dataset", "test acc", "trainable", "run"],
        rows,
        {"test acc": "right", "trainable": "right"},
    )
    out.info(f"{target}/multitask.json; each task's folder is a run (utune eval / utune export take it)")


def _row(name: str, t: Mapping[str, Any]) -> list[Any]:
    acc = t.get("test_acc")
    return [
        name,
        t["dataset"],
        f"{100 * acc:.2f}%" if acc is not None else "-",
        out.fmt_int(t["trainable_params"]),
        t["run"],
    ]

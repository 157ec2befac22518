"""``utune apply`` (build and report; ``--train`` trains) and ``utune eval``."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from utune import _output as out
from utune.cli._common import (
    Checkpoint,
    DataDir,
    Dataset,
    Download,
    Format,
    Overrides,
    check_choice,
    data_overrides,
    set_format,
    spec_file,
    split_overrides,
)
from utune.cli._render import TrainProgress, print_report, print_summary
from utune.errors import TrainingInterrupted, UserInputError

if TYPE_CHECKING:
    from utune.engine.record import Built


def register(app: typer.Typer) -> None:
    app.command()(apply)
    app.command("eval")(eval_cmd)


def apply(
    spec: Annotated[str, typer.Argument(help="the spec .yaml, or a built-in spec's name (utune specs)")],
    overrides: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="build and report, do not train (the default)")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="compare tuned and base outputs on a random batch")] = False,
    train: Annotated[bool, typer.Option("--train", help="train the tuned model")] = False,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run directory (default: runs/<spec>-<time>)")] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="continue a run from its last checkpoint (--out, else this spec's latest run)"),
    ] = False,
    tuners: Annotated[
        Path | None, typer.Option("--tuners", help="load tuner weights (from `utune export --tuners-only`)")
    ] = None,
    download: Download = False,
    fmt: Format = "table",
) -> None:
    """Build the model, attach the spec's tuners, report; with --train, train it."""
    set_format(fmt)
    ov = [*(overrides or []), *data_overrides(dataset, data_dir)]
    if train and dry_run:
        raise UserInputError("--train and --dry-run exclude each other", hint="drop one of them")
    for flag, given in (("--resume", resume), ("--out", out_dir is not None), ("--download", download)):
        if given and not train:
            raise UserInputError(f"{flag} needs --train", hint=f"utune apply {spec} --train {flag} ...")
    path = spec_file(spec)
    if train:
        _train(path, ov, verify, out_dir, resume, tuners, download, fmt)
        return
    from utune.engine.build import build

    built = _load_tuners(build(path, ov, verify=verify), tuners, verify)
    for w in built.warnings:
        out.warn(w)
    if fmt == "json":
        out.print_json(built.report.as_dict())
    else:
        print_report(built.report)


def _load_tuners(built: Built, tuners: Path | None, verify: bool) -> Built:
    if tuners is None:
        return built
    from utune.engine.build import with_tuners

    built, loaded = with_tuners(built, tuners, verify=verify)
    out.note(f"loaded {loaded['tensors']} tensors from {tuners}")
    return built


def _train(
    spec_path: Path,
    ov: list[str],
    verify: bool,
    out_dir: Path | None,
    resume: bool,
    tuners: Path | None,
    download: bool,
    fmt: str,
) -> None:
    """``utune.runs.train_spec``, its report shown before training starts and its summary after."""
    from utune.runs import train_spec

    def show(built: Built, run_dir: Path, notes: list[str]) -> None:
        for note in notes:
            out.note(note)
        for w in built.warnings:
            out.warn(w)
        if fmt != "json":
            print_report(built.report)
        out.note(f"run folder: {run_dir}")

    progress = TrainProgress(enabled=os.environ.get("RANK", "0") == "0")
    try:
        result = train_spec(
            spec_path,
            ov,
            out=out_dir,
            resume=resume,
            tuners=tuners,
            download=download,
            verify=verify,
            reporter=progress,
            on_built=show,
        )
    except TrainingInterrupted as e:
        if e.hint:  # the command as typed: the user's overrides too, or pasting it is refused (check_resume_spec)
            e.hint = e.hint.replace("SPEC", " ".join(shlex.quote(a) for a in [str(spec_path), *ov]))
        raise
    if os.environ.get("RANK", "0") != "0":
        return
    if fmt == "json":
        out.print_json({"run": str(result.run_dir), "report": result.built.report, "summary": result.summary})
    else:
        print_summary(result.summary)
        run_dir = result.run_dir
        out.info(f"run folder: {run_dir}  (next: utune eval {run_dir}; utune export {run_dir} --merge)")


def eval_cmd(
    run: Annotated[str | None, typer.Argument(help="a run directory (default: the latest run under runs/)")] = None,
    overrides: Overrides = None,
    split: Annotated[
        str | None,
        typer.Option(help="train | val | test (every image, evaluation transform); default: test, else val"),
    ] = None,
    checkpoint: Checkpoint = "latest",
    dataset: Dataset = None,
    data_dir: DataDir = None,
    download: Download = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="also draw the confusion matrix into this .png")
    ] = None,
    fmt: Format = "table",
) -> None:
    """Evaluate a trained run's checkpoint: top-1 and top-5 accuracy, loss, per-class accuracy and the
    confusion matrix, on every image of a split."""
    set_format(fmt)
    from utune.runs import RUNS, eval_run, latest_run

    run, ov = split_overrides(run, overrides)
    check_choice("--checkpoint", checkpoint, ("latest", "best"))
    if output is not None and output.suffix.lower() != ".png":
        raise UserInputError(f"-o {output}: the confusion matrix is drawn as a .png", hint="-o confusion.png")
    if run is None:
        run_path = latest_run(RUNS)
        out.note(f"using the latest run: {run_path}")
    else:
        run_path = Path(run)
    ov += data_overrides(None, data_dir)
    result = eval_run(run_path, dataset, split, which=checkpoint, overrides=ov, download=download)
    for w in result["warnings"]:
        out.warn(w)
    if result["note"]:
        out.note(result["note"])
    if output is not None:
        from utune.export.draw import confusion_png

        confusion_png(result["confusion"], result["class_names"], output, title=_eval_title(result))
        result["confusion_png"] = str(output)
    if fmt == "json":
        out.print_json(result)
        return
    print_eval(result)
    if output is not None:
        out.info(f"confusion matrix: {output}")


def _eval_title(result: dict) -> str:
    return f"{result['dataset']} {result['split']}: top-1 {100 * result['acc']:.2f}% on {result['n']} images"


def print_eval(result: dict) -> None:
    """Per-class accuracy (the worst first when there are many classes), then the one-line summary."""
    rows = sorted(result["per_class"], key=lambda r: (r["acc"] is None, r["acc"] if r["acc"] is not None else 0))
    shown = rows if len(rows) <= 20 else rows[:10]
    title = "per-class accuracy" + ("" if len(rows) <= 20 else f" (the 10 lowest of {len(rows)}; all in --format json)")
    out.table(
        title,
        ["class", "images", "accuracy"],
        [[r["name"], r["n"], "-" if r["acc"] is None else f"{100 * r['acc']:.2f}%"] for r in shown],
        justify={"images": "right", "accuracy": "right"},
    )
    out.info(
        f"{result['split']} accuracy: top-1 {100 * result['acc']:.2f}%, top-5 {100 * result['top5']:.2f}% on "
        f"{result['n']} images (loss {result['loss']:.4f}); {result['run']}, {Path(result['checkpoint']).name}"
    )

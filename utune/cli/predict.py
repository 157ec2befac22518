"""``utune predict``: a run, a tuner file or an exported folder on image files (a thin layer over
:func:`utune.runs.predict.predict`)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated

import typer

from utune import _output as out
from utune.cli._common import Checkpoint, Format, check_choice, set_format


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def predict(
    source: Annotated[str, typer.Argument(help="a run folder, a tuner file (with --spec), or an export folder")],
    images: Annotated[list[str], typer.Argument(help="image files, folders (every image inside) or glob patterns")],
    spec: Annotated[
        Path | None, typer.Option("--spec", help="the spec of a tuner file (default: the one the file carries)")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="how many classes to list per image")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per forward pass")] = 32,
    checkpoint: Checkpoint = "latest",
    skip_bad_images: Annotated[
        bool, typer.Option("--skip-bad-images", help="leave unreadable images out (with a warning) instead of stopping")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto")] = "cpu",
    fmt: Format = "table",
) -> None:
    """Label image files with a tuned or exported model: the top-k classes and their probabilities."""
    set_format(fmt, ("table", "json", "csv"))
    check_choice("--checkpoint", checkpoint, ("latest", "best"))
    check_choice("--device", device, ("cpu", "cuda", "auto"))
    from utune.runs.predict import predict as run_predict

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    def progress(done: int, total: int) -> None:
        if total > 32:
            out.note(f"predicted {done:,} / {total:,} images")

    result = run_predict(
        source,
        images,
        spec=spec,
        top_k=top_k,
        batch_size=batch_size,
        which=checkpoint,
        skip_bad_images=skip_bad_images,
        device=device,
        progress=progress,
    )
    for line in result["notes"]:
        out.note(line)
    for line in result["warnings"]:
        out.warn(line)
    if fmt == "json":
        out.print_json(result)
    elif fmt == "csv":
        _write_csv(result)
    else:
        k = result["top_k"]
        columns = ["image", "label", "prob"] + (["next"] if k > 1 else [])
        rows = [
            [p["path"], p["top"][0]["label"], f"{p['top'][0]['prob']:.3f}"]
            + ([", ".join(f"{t['label']} {t['prob']:.3f}" for t in p["top"][1:])] if k > 1 else [])
            for p in result["predictions"]
        ]
        out.table(None, columns, rows, justify={"prob": "right"})


def _write_csv(result: dict) -> None:
    """``path,label_1,prob_1,...,label_k,prob_k``: one row per image, for a spreadsheet or a script."""
    k = result["top_k"]
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["path", *[c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")]])
    for p in result["predictions"]:
        writer.writerow([p["path"], *[c for t in p["top"] for c in (t["label"], f"{t['prob']:.6f}")]])
    sys.stdout.flush()

"""``utune export``: merged weights, tuner-only weights, or a PEFT LoRA folder, from a run or a spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from utune import _output as out
from utune.cli._common import Checkpoint, Format, Overrides, check_choice, set_format, split_overrides
from utune.errors import UserInputError

_MERGE_HELP = "fold every tuner into the base weights: a plain state dict timm/torchvision load strictly"
_ONNX_HELP = "a self-contained ONNX model of any tuner kind (what folds is folded), verified in onnxruntime"
_PT2_HELP = "a self-contained torch.export program (.pt2) of any tuner kind; torch.export.load runs it"
_NAMES = {
    "merge": "merged weights",
    "tuners-only": "tuner weights",
    "peft": "PEFT LoRA folder",
    "onnx": "ONNX model",
    "torch-export": "torch.export program",
}


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("import-peft")(import_peft_cmd)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def export_cmd(
    source: Annotated[
        str | None,
        typer.Argument(help="a run directory (default: the latest run under runs/), or a spec .yaml with --tuners"),
    ] = None,
    overrides: Overrides = None,
    merge: Annotated[bool, typer.Option("--merge", help=_MERGE_HELP)] = False,
    tuners_only: Annotated[
        bool, typer.Option("--tuners-only", help="only tuner and trainable tensors, with the spec (the default)")
    ] = False,
    peft: Annotated[bool, typer.Option("--peft", help="a folder Hugging Face PEFT's PeftModel loads (LoRA)")] = False,
    onnx: Annotated[bool, typer.Option("--onnx", help=_ONNX_HELP)] = False,
    torch_export: Annotated[bool, typer.Option("--torch-export", help=_PT2_HELP)] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file (folder for --peft); default RUN/export/...")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output")] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="skip comparing the exported model with the tuned one")
    ] = False,
    checkpoint: Checkpoint = "latest",
    tuners: Annotated[
        Path | None, typer.Option("--tuners", help="a tuner file to load onto the spec's model first")
    ] = None,
    show_spec: Annotated[
        Path | None, typer.Option("--show-spec", help="print the spec a tuner file carries, and exit")
    ] = None,
    folder: Annotated[
        bool,
        typer.Option("--folder", help="a hub-ready folder: weights, config.json (merged), the spec, a model card"),
    ] = False,
    fmt: Format = "table",
) -> None:
    """Export a trained model: --merge (plain weights), --tuners-only (small file), --peft, --onnx, --torch-export."""
    set_format(fmt, artifact_hint="--format is the output's format; the PEFT folder is `--peft`")
    if show_spec is not None:
        _show_spec(show_spec)
        return
    from utune.runs import export_source

    source, ov = split_overrides(source, overrides)
    check_choice("--checkpoint", checkpoint, ("latest", "best"))
    flags = {"merge": merge, "tuners_only": tuners_only, "peft": peft, "onnx": onnx, "torch_export": torch_export}
    mode, result = export_source(
        source, ov, **flags, output=output, force=force, verify=not no_verify, which=checkpoint, tuners=tuners,
        folder=folder, notify=lambda level, text: out.warn(text) if level == "warn" else out.note(text),
    )  # fmt: skip
    _show_folder(result) if folder else _show(result, mode, no_verify)


def _show_spec(path: Path) -> None:
    from utune.export.tuners_only import embedded_spec

    out.console().print(out.escape_control(embedded_spec(path)), markup=False, highlight=False, soft_wrap=True, end="")


def _show_folder(result: dict[str, Any]) -> None:
    check = result.pop("verify", None)
    if out.json_mode():
        if check is not None:
            result["verify"] = {k: getattr(check, k) for k in ("max_abs_diff", "scale", "tolerance", "ok")}
        out.print_json(result)
        return
    if check is not None:
        out.info(check.line())
    out.info(f"wrote {', '.join(result['files'])} to {result['path']}/")


def _show(result: dict[str, Any], mode: str, no_verify: bool) -> None:
    check = result.pop("verify", None)
    if check is not None:
        result["verify"] = {k: getattr(check, k) for k in ("max_abs_diff", "scale", "tolerance", "ok")}
    if out.json_mode():
        out.print_json(result)
        return
    if mode == "merge":
        out.info(f"merged {result['folds']} tuner(s) into {result['layers']} base layer(s)")
    if mode in ("onnx", "torch-export"):
        if result["folded"]:
            out.info(f"folded into the base weights: {', '.join(result['folded'])}")
        if result["kept"]:
            out.info(f"kept in the graph: {', '.join(result['kept'])} ({result['why_kept']})")
    if check is not None:
        out.info(check.line())
    elif mode == "peft" and not no_verify:
        out.warn("peft is not installed: the folder was not verified (pip install 'utune[peft]')")
    size = _size(result["bytes"])
    if "tensors" in result:
        size = f"{result['tensors']} tensors, {size}"
    out.info(f"wrote {_NAMES[mode]} to {result['path']} ({size})")


def import_peft_cmd(
    folder: Annotated[
        Path, typer.Argument(help="a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="the tuner file to write (its spec: the .yaml beside)")
    ],
    model: Annotated[
        str | None, typer.Option("--model", help="the timm (or torchvision:) model it was trained on")
    ] = None,
    like: Annotated[
        Path | None,
        typer.Option("--spec", help="take the model (name, weights, kwargs, classes, size) from this spec"),
    ] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="the head's classes")] = None,
    img_size: Annotated[int | None, typer.Option("--img-size", help="the model's input size")] = None,
    pretrained: Annotated[
        str | None,
        typer.Option("--pretrained", help="the base weights: true (timm's, the default), or a .safetensors/.pth file"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing outputs")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the comparison with PEFT's own model")] = False,
    fmt: Format = "table",
) -> None:
    """Convert a PEFT LoRA or IA3 adapter trained on a timm model into a utune spec and tuner file."""
    set_format(fmt)
    from utune.runs import import_peft

    result = import_peft(
        folder,
        _model_section(model, like, num_classes, img_size, pretrained),
        output,
        force=force,
        verify=not no_verify,
    )
    check = result.pop("verify", None)
    if out.json_mode():
        if check is not None:
            result["verify"] = {k: getattr(check, k) for k in ("max_abs_diff", "scale", "tolerance", "ok")}
        out.print_json(result)
        return
    if check is not None:
        out.info(check.line().replace("merged", "PEFT"))
    elif not no_verify:
        out.warn("peft is not installed: the import was not compared with PEFT's model (pip install 'utune[peft]')")
    out.info(f"wrote {result['tensors']} tensors to {result['path']} and the spec to {result['spec']}")
    out.info(f"next: utune apply {result['spec']} --tuners {result['path']} --dry-run --verify")


def _model_section(
    model: str | None, like: Path | None, num_classes: int | None, img_size: int | None, pretrained: str | None
) -> dict[str, Any]:
    """The spec's model section for import-peft: from ``--spec``'s model, or ``--model``; options override."""
    if (model is None) == (like is None):
        raise UserInputError(
            "import-peft needs the base model: --model NAME or --spec SPEC (one of them)",
            hint="e.g. utune import-peft FOLDER --model vit_base_patch16_224 -o tuners.safetensors",
        )
    section: dict[str, Any] = {"name": model, "pretrained": True}
    if like is not None:
        from utune.spec import load_spec

        section = load_spec(like).model.model_dump(exclude_none=True)
    if pretrained is not None:
        low = pretrained.lower()
        section["pretrained"] = {"true": True, "false": False}.get(low, str(Path(pretrained).resolve()))
    if num_classes is not None:
        section["num_classes"] = num_classes
    if img_size is not None:
        section["img_size"] = img_size
    return section

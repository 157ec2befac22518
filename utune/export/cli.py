"""``utune export``: merged weights, tuner-only weights, or a PEFT LoRA folder from a run or a spec.

Wired into the app with :func:`register_cli` (``utune.cli`` calls it once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from utune.errors import UserInputError

_MODE_HELP = "fold every tuner into the base weights; writes a plain state dict timm/torchvision load strictly"


def _mode(merge: bool, tuners_only: bool, fmt: str | None, spec_export: object | None) -> str:
    if fmt not in (None, "safetensors", "peft"):
        raise UserInputError(f"unknown --format {fmt!r}", hint="use safetensors or peft")
    if merge and tuners_only:
        raise UserInputError("--merge and --tuners-only exclude each other", hint="drop one of them")
    if fmt == "peft" and (merge or tuners_only):
        raise UserInputError("--format peft writes unmerged LoRA weights; drop --merge/--tuners-only")
    if merge:
        return "merge"
    if tuners_only:
        return "tuners-only"
    if fmt == "peft":
        return "peft"
    if spec_export is not None:  # the spec's own `export:` section decides when the command line does not
        if getattr(spec_export, "merge", False):
            return "merge"
        if getattr(spec_export, "format", None) == "peft" and fmt is None:
            return "peft"
    return "tuners-only"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def register_cli(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""

    @app.command("export")
    def export_cmd(
        source: Annotated[
            str | None,
            typer.Argument(help="a run directory (default: the latest under runs/), or a spec .yaml with --tuners"),
        ] = None,
        overrides: Annotated[
            list[str] | None, typer.Argument(help="key.path=value overrides for the rebuild, e.g. model.pretrained=x")
        ] = None,
        merge: Annotated[bool, typer.Option("--merge", help=_MODE_HELP)] = False,
        tuners_only: Annotated[
            bool, typer.Option("--tuners-only", help="only tuner and trainable tensors, with the spec (the default)")
        ] = False,
        fmt: Annotated[
            str | None, typer.Option("--format", help="safetensors | peft (a folder PEFT's PeftModel loads)")
        ] = None,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="file (folder for peft); default RUN/export/...")
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="overwrite an existing output")] = False,
        no_verify: Annotated[
            bool, typer.Option("--no-verify", help="skip comparing the exported model with the tuned one")
        ] = False,
        checkpoint: Annotated[str, typer.Option("--checkpoint", help="latest | best")] = "latest",
        tuners: Annotated[
            Path | None, typer.Option("--tuners", help="a tuner file to load onto the spec's model first")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    ) -> None:
        """Export a trained model: --merge (plain weights), --tuners-only (small file), or --format peft."""
        from utune import _output as out
        from utune.export.io import check_target
        from utune.export.run import default_output, export, load_source

        ov = list(overrides or [])
        if source is not None and "=" in source and not Path(source).exists():
            ov.insert(0, source)  # `utune export key=value`: an override, the latest run
            source = None
        if checkpoint not in ("latest", "best"):
            raise UserInputError(f"unknown --checkpoint {checkpoint!r}", hint="use latest or best")
        _mode(merge, tuners_only, fmt, None)  # bad flags and an existing -o fail before the (slow) rebuild
        if output is not None:
            check_target(output, force)
        elif source is not None and source.endswith((".yaml", ".yml")):
            raise UserInputError("exporting from a spec needs -o/--output")
        built = load_source(source, ov, tuners=tuners, which=checkpoint)
        mode = _mode(merge, tuners_only, fmt, getattr(built.spec, "export", None))
        path = output if output is not None else default_output(source, mode)
        result = export(built, mode, path, force=force, verify=not no_verify)
        check = result.pop("verify", None)
        if as_json:
            if check is not None:
                result["verify"] = {k: getattr(check, k) for k in ("max_abs_diff", "scale", "tolerance", "ok")}
            out.print_json(result)
            return
        if mode == "merge":
            out.info(f"merged {result['folds']} tuner(s) into {result['layers']} base layer(s)")
        if check is not None:
            out.info(check.line())
        elif mode == "peft" and not no_verify:
            out.warn("peft is not installed: the folder was not verified (pip install 'utune[peft]')")
        what = {"merge": "merged weights", "tuners-only": "tuner weights", "peft": "PEFT LoRA folder"}[mode]
        out.info(f"wrote {what} to {result['path']} ({result['tensors']} tensors, {_size(result['bytes'])})")

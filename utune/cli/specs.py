"""``utune specs`` (the built-in specs: list, ``show``, ``cp``) and ``utune quickstart``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from utune import _output as out
from utune.cli._common import Format, set_format

specs_app = typer.Typer(
    help="The built-in specs (the reference specs and the quickstart's methods): list, show, copy.",
    invoke_without_command=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(specs_app, name="specs")
    app.command("quickstart")(quickstart)


@specs_app.callback()
def specs_list(
    ctx: typer.Context,
    grep: Annotated[
        str | None,
        typer.Option("--grep", help="a glob over the names (vit_b16_*/*lora*), or a word of name, method, paper, kind"),
    ] = None,
    fmt: Format = "table",
) -> None:
    """List the built-in specs: name, method, paper, backbone, trainable parameters, mergeable, path.
    A name works wherever a spec path does (utune apply vit_b16_cifar100/lora --dry-run)."""
    if ctx.invoked_subcommand is not None:
        return
    set_format(fmt)
    from utune.runs.catalog import listing
    from utune.spec.catalog import roots

    rows = listing(grep)
    base = roots().specs.parent
    if fmt == "json":
        out.print_json(rows)
        return
    out.table(
        f"{len(rows)} built-in specs" + (f" matching {grep!r}" if grep else ""),
        ["name", "method", "paper", "backbone", "trainable", "merges", "path"],
        [
            [
                r["name"],
                _short(r["method"], 44),
                ", ".join(p.removeprefix("arXiv ") for p in r["papers"]) or "-",
                r["backbone"],
                out.fmt_int(r["trainable"]),
                {True: "yes", False: "no", None: "-"}[r["mergeable"]],
                _short_path(r["path"], base),
            ]
            for r in rows
        ],
        {"trainable": "right"},
    )
    if not rows:
        out.warn(f"no built-in spec matches {grep!r}")
    else:
        out.note(f"paths under {base}; utune specs show NAME prints one, utune specs cp NAME copies it to edit")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def _short_path(path: str, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return path


@specs_app.command("show")
def specs_show(name: Annotated[str, typer.Argument(help="a built-in spec's name (utune specs lists them)")]) -> None:
    """Print a built-in spec, its header included (stdout: the file as it is; its path on stderr)."""
    from utune.spec.catalog import find

    entry = find(name)
    out.note(f"# {entry.name}: {entry.path}")
    sys.stdout.write(entry.path.read_text(encoding="utf-8"))
    sys.stdout.flush()


@specs_app.command("cp")
def specs_cp(
    name: Annotated[str, typer.Argument(help="a built-in spec's name (utune specs lists them)")],
    dest: Annotated[Path | None, typer.Argument(help="a file or folder (default: NAME's file name, here)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite DEST if it exists")] = False,
    fmt: Format = "table",
) -> None:
    """Copy a built-in spec to edit it (refuses to overwrite unless --force)."""
    set_format(fmt)
    from utune.spec.catalog import copy

    entry, target, rewritten = copy(name, dest, force=force)
    if fmt == "json":
        out.print_json({"name": entry.name, "source": str(entry.path), "path": str(target), "rewritten": rewritten})
        return
    more = f" ({', '.join(rewritten)} made absolute: the copy works where it is)" if rewritten else ""
    out.info(f"wrote {target}{more}; next: utune apply {target} --dry-run")


def quickstart(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides for every method, e.g. train.seed=1")
    ] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="U-Tuning and LoRA, 2 steps each: the pipeline in seconds")
    ] = False,
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="a comma-separated subset of linear,full,utuning,lora,vpt_deep,bypass"),
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run folder (default: runs/quickstart-<time>)")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default 1; see the README)")] = None,
    augment: Annotated[
        str, typer.Option("--augment", help="the training transform: none (the specs'), timm or crop (see README)")
    ] = "none",
    no_export: Annotated[bool, typer.Option("--no-export", help="skip the export step")] = False,
) -> None:
    """The quickstart, offline: six methods tune a small ViT that utune pre-trained on Fashion-MNIST to
    scikit-learn's digits, then evaluate and export (about 2 min on 2 cores); prints the results table."""
    from utune.cli._common import check_choice
    from utune.errors import UtuneError
    from utune.spec.catalog import roots

    check_choice("--augment", augment, ("none", "timm", "crop"))
    run = roots().quickstart / "run.py"
    if not run.is_file():
        raise UtuneError(f"the quickstart is missing from this installation ({run})", hint="reinstall utune")
    args = [*(["--smoke"] if smoke else []), *(["--no-export"] if no_export else [])]
    args += [*(["--methods", methods] if methods else []), *(["--out", str(out_dir)] if out_dir else [])]
    args += [*(["--threads", str(threads)] if threads is not None else []), "--augment", augment]
    args += list(overrides or [])
    code = _run_quickstart(run, args)
    if code:
        raise typer.Exit(code)


def _run_quickstart(run: Path, args: list[str]) -> int:
    """quickstart/run.py's ``main`` (loaded from its file: it lives in the checkout's quickstart/ or in the
    wheel's package data) with the command's arguments."""
    import importlib.util

    from utune.errors import UtuneError

    spec = importlib.util.spec_from_file_location("utune_quickstart_run", run)
    if spec is None or spec.loader is None:
        raise UtuneError(f"cannot load the quickstart from {run}", hint="reinstall utune")
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args) or 0)

"""The ``utune`` command: a thin Typer layer over :mod:`utune.api`.

Every expected failure is a :class:`utune.errors.UtuneError`; :func:`main` prints it as one line plus
a hint and exits 2 (bad input) or 1 (internal). ``UTUNE_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from utune import _output as out
from utune.errors import UserInputError, UtuneError

app = typer.Typer(
    help="Config-driven model surgery for parameter-efficient transfer learning (U-Tuning).",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
spec_app = typer.Typer(help="Check spec files and print their schema.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")

from utune.export.cli import register_cli  # noqa: E402  (the export command lives with the export code)

register_cli(app)

Format = Annotated[str, typer.Option("--format", "-f", help="table | json (inspect: also tree)")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key.path=value overrides, e.g. tuners.0.dim=16")]


def _check_format(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise UserInputError(f"unknown --format {fmt!r}", hint=f"use one of: {', '.join(allowed)}")
    return fmt


@app.command()
def inspect(
    model_or_spec: Annotated[str, typer.Argument(help="a timm name, torchvision:NAME, or a spec .yaml")],
    grep: Annotated[str | None, typer.Option(help="only sites whose path matches this glob (or substring)")] = None,
    depth: Annotated[int | None, typer.Option(min=0, help="only sites at most N segments deep")] = None,
    spec: Annotated[Path | None, typer.Option(help="show which rule of this spec matches each site")] = None,
    all_ops: Annotated[bool, typer.Option("--all", help="include functional calls in table/tree")] = False,
    fmt: Format = "table",
) -> None:
    """List the sites of a model's graph: path, op, type, output shape, parameters. Needs no weights."""
    from utune.api import inspect as api_inspect
    from utune.graph.glob import glob_match

    _check_format(fmt, ("table", "tree", "json"))
    rows = api_inspect(model_or_spec, spec=spec)
    if grep:
        wild = any(c in grep for c in "*?[")
        rows = [r for r in rows if (glob_match(grep, r["path"]) if wild else grep in r["path"])]
    if depth is not None:
        rows = [r for r in rows if r["path"].split("::")[0].count(".") < depth]
    if fmt == "json":
        out.print_json(rows)
        return
    shown = rows if (all_ops or grep or fmt == "json") else [r for r in rows if r["op"] not in ("function", "method")]
    has_rules = spec is not None
    if fmt == "tree":
        label = lambda r: (  # noqa: E731
            f"{r['path'].rpartition('.')[2] if '::' not in r['path'] else r['path']} [dim]{r['type']}"
            f" {r['shape'] or ''} {out.fmt_int(r['params']) if r['params'] else ''}[/]"
            + (f" [green]<- {', '.join(r['rules'])}[/]" if has_rules and r.get("rules") else "")
        )
        out.tree(model_or_spec, [(r["path"], label(r)) for r in shown if r["op"] != "uncalled"])
    else:
        cols = ["path", "op", "type", "shape", "params"] + (["rules"] if has_rules else [])
        out.table(
            None,
            cols,
            [
                [r["path"], r["op"], r["type"], r["shape"], out.fmt_int(r["params"])]
                + ([", ".join(r["rules"])] if has_rules else [])
                for r in shown
            ],
            {"params": "right"},
        )
    uncalled = [r for r in rows if r["op"] == "uncalled"]
    if uncalled:
        out.warn(
            f"{len(uncalled)} layer(s) are never called as modules and cannot take a tuner, e.g. {uncalled[0]['path']}"
        )
    hidden = len(rows) - len(shown)
    if hidden and fmt != "json":
        out.info(f"[dim]{len(shown)} sites shown; {hidden} functional calls hidden (--all shows them)[/]")


@spec_app.command("validate")
def spec_validate(files: Annotated[list[Path], typer.Argument(help="spec files to check")]) -> None:
    """Validate spec files; prints every problem of every file with its line."""
    from utune.spec import validate_files

    bad = 0
    for path, err in validate_files(files):
        if err is None:
            out.info(f"[green]ok[/] {path}")
        else:
            bad += 1
            out.error(err.message, err.hint)
    if bad:
        raise typer.Exit(2)


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the spec's JSON schema (point your editor's YAML language server at it)."""
    from utune.spec import spec_json_schema

    out.print_json(spec_json_schema())


@app.command()
def tuners(fmt: Format = "table") -> None:
    """List the tuner kinds with their options and defaults."""
    from utune.tuners.registry import kinds

    _check_format(fmt, ("table", "json"))
    rows = []
    for name, cls in kinds().items():
        fields = cls.Options.model_fields
        opts = {k: (repr(f.default) if f.default is not None else "None") for k, f in fields.items()}
        rows.append(
            {
                "kind": name,
                "placements": list(cls.placements),
                "default_placement": cls.default_placement,
                "mergeable": cls.mergeable,
                "options": opts,
                "summary": cls.summary,
            }
        )
    if fmt == "json":
        out.print_json(rows)
        return
    out.table(
        "tuner kinds",
        ["kind", "placements", "options (defaults)", "merge", "what"],
        [
            [
                r["kind"],
                ", ".join(r["placements"]),
                ", ".join(f"{k}={v}" for k, v in r["options"].items()),
                "yes" if r["mergeable"] else "",
                r["summary"],
            ]
            for r in rows
        ],
    )


def _print_report(report: dict[str, Any]) -> None:
    rows = [
        [
            t["name"],
            t["kind"],
            t["placement"],
            len(t["sites"]),
            ", ".join(t["sites"][:3]) + (" ..." if len(t["sites"]) > 3 else ""),
            out.fmt_int(t["params"]),
        ]
        for t in report["tuners"]
    ]
    out.table(
        f"{report['model']}",
        ["rule", "kind", "placement", "sites", "first sites", "params"],
        rows,
        {"params": "right", "sites": "right"},
    )
    if report["trainable"]:
        out.info(
            f"trainable base parameters ({', '.join(report['trainable'])}): "
            f"{out.fmt_int(report['base_trainable_params'])}"
        )
    out.info(
        f"trainable params: {out.fmt_int(report['trainable_params'])} || all params: "
        f"{out.fmt_int(report['total_params'])} || trainable%: {report['trainable_pct']:.4f}"
    )
    if report.get("identity_max_abs_diff") is not None:
        claim = all(t["identity_at_init"] for t in report["tuners"])
        note = "identity at init" if claim else "not all tuners start as the identity"
        if report.get("tuners_file"):
            note = f"the effect of the tuners loaded from {report['tuners_file']}"
        out.info(f"verify: max |tuned - base| = {report['identity_max_abs_diff']:.3g} on a random batch ({note})")


@app.command()
def apply(
    spec: Annotated[Path, typer.Argument(help="the spec .yaml")],
    overrides: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="build and report, do not train")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="compare tuned and base outputs on a random batch")] = False,
    train: Annotated[bool, typer.Option("--train", help="train the tuned model")] = False,
    dataset: Annotated[str | None, typer.Option(help="override data.dataset")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="override data.root")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<spec>-<time>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint in --out")] = False,
    tuners: Annotated[
        Path | None, typer.Option("--tuners", help="load tuner weights (from `utune export --tuners-only`)")
    ] = None,
    fmt: Format = "table",
) -> None:
    """Build the model, attach the spec's tuners, report; with --train, train it."""
    from utune.api import build

    _check_format(fmt, ("table", "json"))
    ov = list(overrides or [])
    if dataset:
        ov.append(f"data.dataset={dataset}")
    if data_dir:
        ov.append(f"data.root={data_dir}")
    if train and dry_run:
        raise UserInputError("--train and --dry-run exclude each other", hint="drop one of them")
    if resume and not train:
        raise UserInputError("--resume needs --train")
    built = build(spec, ov, verify=verify)
    if tuners is not None:
        from utune.export import load_tuners

        loaded = load_tuners(built, tuners)
        built.report["tuners_file"] = str(tuners)
        out.info(f"loaded {loaded['tensors']} tensors from {tuners}")
        if verify:  # --verify compares against the base: with loaded tuners it reports their effect
            from utune.api import refresh_verify

            refresh_verify(built)
    for w in built.warnings:
        out.warn(w)
    if not train:
        if fmt == "json":
            out.print_json(built.report)
        else:
            _print_report(built.report)
        return
    from utune.train.run import train_run

    if fmt != "json":
        _print_report(built.report)
    summary = train_run(built, out_dir, resume=resume)
    if fmt == "json":
        out.print_json(summary)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `utune apply --train`")],
    dataset: Annotated[str | None, typer.Option(help="evaluate on another dataset")] = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    fmt: Format = "table",
) -> None:
    """Evaluate a trained run's checkpoint."""
    from utune.train.run import eval_run

    _check_format(fmt, ("table", "json"))
    result = eval_run(run_dir, dataset, split)
    if fmt == "json":
        out.print_json(result)
    else:
        out.info(f"{split} accuracy: {100 * result['acc']:.2f}% on {result['n']} images (loss {result['loss']:.4f})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning UtuneErrors into one-line messages and exit codes."""
    debug = os.environ.get("UTUNE_DEBUG") == "1"
    try:
        app(args=argv, prog_name="utune")
    except UtuneError as e:
        if debug:
            raise
        out.error(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        out.error("interrupted")
        sys.exit(130)
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if debug:
            raise
        out.error(f"internal error: {type(e).__name__}: {e}", "rerun with UTUNE_DEBUG=1 and report the traceback")
        sys.exit(1)

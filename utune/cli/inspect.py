"""``utune inspect``, ``utune tuners`` and ``utune spec validate | schema | show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from utune import _output as out
from utune.cli._common import Format, set_format, spec_file
from utune.errors import UserInputError, UtuneError


def register(app: typer.Typer, spec_app: typer.Typer) -> None:
    app.command()(inspect)
    tuners_app = typer.Typer(
        help="List the tuner kinds (`utune tuners`), or run the contract kit on one (`utune tuners check NAME`).",
        invoke_without_command=True,
    )
    tuners_app.callback()(tuners)
    tuners_app.command("check")(tuners_check)
    app.add_typer(tuners_app, name="tuners")
    spec_app.command("validate")(spec_validate)
    spec_app.command("schema")(spec_schema)
    spec_app.command("show")(spec_show)
    app.command()(draw)
    app.command()(plot)


def inspect(
    model_or_spec: Annotated[
        str,
        typer.Argument(
            help="a timm name, torchvision:NAME, a factory pkg.module:function, a spec .yaml or a built-in spec name"
        ),
    ],
    grep: Annotated[str | None, typer.Option(help="only sites whose path matches this glob (or substring)")] = None,
    depth: Annotated[int | None, typer.Option(min=0, help="only sites at most N segments deep")] = None,
    spec: Annotated[
        str | None, typer.Option(help="show which rule of this spec (a file or a built-in name) matches each site")
    ] = None,
    all_ops: Annotated[bool, typer.Option("--all", help="include functional calls in table/tree")] = False,
    fmt: Format = "table",
) -> None:
    """List the sites of a model's graph: path, op, type, output shape, parameters. Needs no weights."""
    set_format(fmt, ("table", "tree", "json"))
    target = model_or_spec
    from utune.spec.catalog import is_builtin_name

    if model_or_spec.endswith((".yaml", ".yml")) or Path(model_or_spec).is_file() or is_builtin_name(model_or_spec):
        target = str(spec_file(model_or_spec))
    else:
        from utune._imports import entry_points, is_ref, trust
        from utune.errors import ModelError
        from utune.models.names import MODELS_GROUP, TORCHVISION_PREFIX, unknown_model

        if is_ref(model_or_spec) and not model_or_spec.startswith(TORCHVISION_PREFIX):
            trust([model_or_spec])  # typed on the command line: the user's own name
        elif (found := unknown_model(model_or_spec)) is not None and model_or_spec not in entry_points(MODELS_GROUP):
            raise ModelError(*found)  # before the (slow) torch import
    from utune.engine.build import inspect_with_rules

    rows, rules = inspect_with_rules(target, spec=spec_file(spec) if spec is not None else None, grep=grep, depth=depth)
    if fmt == "json":
        out.print_json(rows)
    else:
        _show_sites(model_or_spec, rows, fmt, all_ops or bool(grep), spec is not None)
    _rule_summary(rules)
    uncalled = [r for r in rows if r["op"] == "uncalled"]
    if uncalled:
        out.warn(
            f"{len(uncalled)} layer(s) are never called as modules and cannot take a tuner, e.g. {uncalled[0]['path']}"
        )


def _show_sites(title: str, rows: list[dict[str, Any]], fmt: str, all_ops: bool, has_rules: bool) -> None:
    shown = rows if all_ops else [r for r in rows if r["op"] not in ("function", "method")]
    if fmt == "tree":
        out.tree(title, [(r["path"], _tree_label(r, has_rules)) for r in shown if r["op"] != "uncalled"])
    else:
        cols = ["path", "op", "type", "shape", "params"] + (["rules"] if has_rules else [])
        body = [
            [r["path"], r["op"], r["type"], r["shape"], out.fmt_int(r["params"])]
            + ([", ".join(r["rules"])] if has_rules else [])
            for r in shown
        ]
        out.table(None, cols, body, {"params": "right"})
    hidden = len(rows) - len(shown)
    if hidden:
        out.note(f"[dim]{len(shown)} sites shown; {hidden} functional calls hidden (--all shows them)[/]", markup=True)


def _tree_label(r: dict[str, Any], has_rules: bool) -> str:
    name = r["path"].rpartition(".")[2] if "::" not in r["path"] else r["path"]
    label = f"{name} [dim]{r['type']} {r['shape'] or ''} {out.fmt_int(r['params']) if r['params'] else ''}[/]"
    if has_rules and r.get("rules"):
        label += f" [green]<- {', '.join(r['rules'])}[/]"
    return label


def _rule_summary(rules: list[dict[str, Any]]) -> None:
    """With --spec: each rule's match count (stdout in table mode, stderr in JSON mode); no match warns."""
    for r in rules:
        if r["error"]:
            out.warn(f"rule {r['name']!r} ({r['kind']}) matches nothing: {r['error']}")
            continue
        first = ", ".join(r["sites"][:3]) + (" ..." if len(r["sites"]) > 3 else "")
        out.info(f"rule {r['name']} ({r['kind']}): {len(r['sites'])} site(s): {first}")
        for w in r["warnings"]:
            out.warn(w)


def tuners(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | json | markdown")] = "table",
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", help="also list this kind from your code (package.module:Class); repeatable"),
    ] = None,
) -> None:
    """List the tuner kinds (built-in, published by installed packages, and --kind ones) with their options."""
    if ctx.invoked_subcommand is not None:
        return
    set_format(fmt, ("table", "json", "markdown"))
    from utune._imports import trust
    from utune.tuners.registry import describe_kinds, kinds, kinds_markdown, plugin_problems

    trust(kind or [])  # named on the command line: the user's
    rows = describe_kinds([*kinds(), *(k for k in kind or [] if k not in kinds())])
    for name, why in plugin_problems().items():
        out.warn(f"tuner kind {name!r} (entry point utune.kinds) cannot be loaded: {why}")
    if fmt == "json":
        out.print_json(rows)
        return
    if fmt == "markdown":
        out.console().print(kinds_markdown(rows), markup=False, highlight=False, soft_wrap=True)
        return
    out.table(
        "tuner kinds",
        ["kind", "placements", "options (defaults)", "merge", "what"],
        [
            [
                r["kind"],
                ", ".join(r["placements"]),
                ", ".join(f"{k}={_shown(o['default'])}" for k, o in r["options"].items()),
                "yes" if r["mergeable"] else "",
                r["summary"],
            ]
            for r in rows
        ],
    )


def tuners_check(
    name: Annotated[str, typer.Argument(help="a kind: lora, gated_adapter, my_pkg.kinds:GatedAdapter, module")],
    keys: Annotated[
        list[str] | None,
        typer.Argument(help="more rule keys as key=value (rank=4, class=my_pkg.mods:MyU for kind module)"),
    ] = None,
    at: Annotated[
        str | None, typer.Option(help="layer (a Linear/Conv per architecture), block, or one selector for all")
    ] = None,
    arch: Annotated[
        list[str] | None, typer.Option(help="only this architecture (vit, swin, convnext, resnet, tv_resnet)")
    ] = None,
    fmt: Format = "table",
) -> None:
    """Run the contract kit (utune.testing.check_kind) on a kind: identity at init, gradients, frozen weights,
    tuner-only round trip, merged == unmerged, over small real architectures. Exit 1 when a contract fails."""
    set_format(fmt)
    import yaml

    from utune._imports import trust
    from utune.testing import ARCHS, check_kind

    rule: dict[str, Any] = {"kind": name}
    for item in keys or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"bad rule key {item!r}", hint="write key=value, e.g. rank=4 or class=pkg.mods:MyU")
        rule[key.strip()] = yaml.safe_load(value)
    trust([name, *(v for v in rule.values() if isinstance(v, str))])  # named on the command line
    unknown = [a for a in arch or [] if a not in ARCHS]
    if unknown:
        raise UserInputError(f"unknown architecture {unknown[0]!r}", hint=f"the kit has: {', '.join(ARCHS)}")
    from utune.errors import SpecError
    from utune.tuners.registry import get_kind

    get_kind(name)  # an unknown or unimportable kind: one clear line before any model is built
    try:
        report = check_kind(rule, at=at, archs=arch)
    except ValueError as e:
        raise SpecError(str(e), hint="`utune tuners` lists the kinds and their options") from None
    if fmt == "json":
        out.print_json(report.as_dict())
    else:
        out.table(
            f"contracts of {report.kind}",
            ["arch", "contract", "result", "detail"],
            [[r.arch, r.contract, r.status, r.detail] for r in report.results],
        )
        verdict = "all contracts hold" if report.ok else f"{len(report.failures)} contract(s) failed"
        (out.info if report.ok else out.warn)(f"{report.kind}: {verdict}")
    if not report.ok:
        raise typer.Exit(1)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def spec_validate(
    files: Annotated[list[str], typer.Argument(help="spec files (or built-in spec names) to check")],
    model: Annotated[
        bool,
        typer.Option("--model", help="also build each spec's model (no weights) to check model names and selectors"),
    ] = False,
    fmt: Format = "table",
) -> None:
    """Validate spec files: every problem of every file, with its line.

    Without --model: the schema, the tuner kinds and their options. With --model: also the model name, that
    every rule's `at:` matches sites its kind can serve, and the `trainable:` globs (a dry run, no weights).
    """
    set_format(fmt)
    from utune.errors import SpecError
    from utune.spec import validate_files

    paths: list[Path] = []
    for f in files:
        try:
            paths.append(spec_file(f))
        except SpecError:  # neither a file nor a built-in: validate_files reports it with the others
            paths.append(Path(f))
    results = []
    err: UtuneError | None
    for path, err in validate_files(paths):
        if err is None and model:
            err = _check_against_model(path)
        checked = "schema, kinds and options" + (", model, selectors and trainable globs" if model else "")
        results.append({"file": str(path), "ok": err is None, "checked": checked, "error": _err_text(err)})
        if err is None:
            more = "" if model else " (model names and selectors not checked: add --model)"
            out.info(f"[green]ok[/] {escape(str(path))}: {checked}{more}", markup=True)
        else:
            out.error(err.message, err.hint)
    if fmt == "json":
        out.print_json(results)
    if any(not r["ok"] for r in results):
        raise typer.Exit(2)


def _check_against_model(path: Path) -> UtuneError | None:
    from utune.engine.build import build
    from utune.spec import load_spec

    try:
        spec = load_spec(path)
        ov = ["model.pretrained=false"] if spec.model.pretrained is True else []
        build(spec, ov)
    except UtuneError as e:
        return e
    return None


def _err_text(err: UtuneError | None) -> str | None:
    if err is None:
        return None
    return err.message + (f"\nhint: {err.hint}" if err.hint else "")


def spec_schema() -> None:
    """Print the spec's JSON schema (point your editor's YAML language server at it)."""
    from utune.spec import spec_json_schema

    out.print_json(spec_json_schema())


def spec_show(
    source: Annotated[
        Path, typer.Argument(help="a tuner file (.safetensors from export), a run directory, or a built-in spec's name")
    ],
) -> None:
    """Print the spec a tuner file or a training run carries (YAML, re-loadable with `utune apply`), or a
    built-in spec (as `utune specs show NAME`)."""
    from utune.export.tuners_only import embedded_spec

    if not source.exists() and not str(source).endswith(".safetensors"):
        from utune.spec.catalog import matches

        if matches(str(source)):
            text = spec_file(str(source)).read_text(encoding="utf-8")
            out.console().print(text, markup=False, highlight=False, soft_wrap=True, end="")
            return
    out.console().print(
        out.escape_control(embedded_spec(source)), markup=False, highlight=False, soft_wrap=True, end=""
    )


def draw(
    spec: Annotated[str, typer.Argument(help="the spec .yaml, or a built-in spec's name")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help=".png, .svg or .pdf")] = Path("structure.png"),
) -> None:
    """Draw where each rule's tuners sit on the backbone (no weights needed)."""
    from utune.engine.build import build
    from utune.export.draw import draw_structure
    from utune.spec import load_spec

    loaded = load_spec(spec_file(spec), list(overrides or []))
    built = build(loaded, ["model.pretrained=false"] if loaded.model.pretrained is True else [])
    out.info(f"wrote {draw_structure(built, output)}")


def plot(
    runs: Annotated[list[Path], typer.Argument(help="run folders (their metrics.jsonl)")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".png, .svg or .pdf")] = Path("curves.png"),
) -> None:
    """Plot the training loss and evaluation accuracy of one or several runs."""
    from utune.export.draw import plot_runs

    out.info(f"wrote {plot_runs(runs, output)}")

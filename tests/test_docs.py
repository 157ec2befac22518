"""The docs cannot drift: the CLI reference is the Typer app's, the architecture page names files and
functions that exist, and the README stays a front page."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from utune.cli.reference import cli_reference

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def test_the_cli_reference_is_generated_from_the_app() -> None:
    assert (DOCS / "cli.md").read_text() == cli_reference(), "regenerate: python -m utune.cli.reference > docs/cli.md"


def test_the_cli_reference_lists_every_command() -> None:
    text = (DOCS / "cli.md").read_text()
    for command in ("apply", "eval", "export", "inspect", "tuners", "spec validate", "compare", "multitask", "predict"):
        assert f"## `utune {command}" in text


def test_the_architecture_page_names_files_that_exist() -> None:
    text = (DOCS / "architecture.md").read_text()
    paths = set(re.findall(r"`(utune/[\w/<>.]+)`", text))
    assert len(paths) > 30
    missing = [p for p in sorted(paths) if "<" not in p and not (REPO / p).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_architecture_page_names_calls_that_exist() -> None:
    text = (DOCS / "architecture.md").read_text()
    calls = set(re.findall(r"`(utune(?:\.\w+)+)\(", text))
    assert len(calls) > 8
    for dotted in sorted(calls):
        module, _, name = dotted.rpartition(".")
        while module and not _importable(module):
            module, _, outer = module.rpartition(".")
            name = f"{outer}.{name}"
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        assert callable(obj), dotted


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def test_the_readme_is_a_front_page() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"

"""The README and docs/ cannot drift from the code: their shell and Python blocks run, their specs
validate, the README's tuner table is the registry's.

A block preceded by ``<!-- ci: not run here: REASON -->`` is skipped (the reason says why). The rest run
as written, in order within a block, from a fresh folder that holds the repository's ``quickstart/`` and
``specs/`` (so relative paths work as they do from the repository root), with the venv's ``utune`` first
on PATH and nothing downloadable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utune.spec import load_spec_text
from utune.tuners.registry import kinds_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("**/*.md"))]
_SKIP = re.compile(r"<!--\s*ci:\s*not run here:\s*(?P<why>.+?)\s*-->")


def blocks(doc: Path = README) -> list[tuple[str, str, str, str | None]]:
    """(id, language, body, reason it is skipped or None) for every fenced block of ``doc``."""
    lines = doc.read_text().splitlines()
    name = "" if doc == README else doc.relative_to(REPO).as_posix() + ":"
    out, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        skip = _SKIP.search(lines[i - 1]) if i else None
        body = "\n".join(lines[i + 1 : end]) + "\n"
        out.append((f"{name}{fence.group(1)}-line{i + 1}", fence.group(1), body, skip.group("why") if skip else None))
        i = end + 1
    return out


BLOCKS = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in BLOCKS if b[1] in ("bash", "python")]


def test_the_readme_has_runnable_blocks() -> None:
    assert len([b for b in RUNNABLE if b[3] is None]) >= 3
    assert all(b[3] for b in BLOCKS if b[3] is not None), "a skipped block must say why"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in ("quickstart", "specs", "examples"):  # relative paths work as from the repository root
        if (REPO / name).exists():
            (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def _env(cwd: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("UTUNE_DEBUG", "WORLD_SIZE")}
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        UTUNE_DATA=str(cwd / "data"),
    )
    return env


@pytest.mark.parametrize(("ident", "lang", "body", "skip"), RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_readme_block_runs(ident: str, lang: str, body: str, skip: str | None, workdir: Path) -> None:
    if skip is not None:
        pytest.skip(f"README says: {skip}")
    if lang == "bash":
        cmd = ["bash", "-c", "set -euo pipefail\n" + body]
    else:
        cmd = [sys.executable, "-c", body]
    proc = subprocess.run(cmd, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README block {ident} failed:\n{body}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("ident", "body"), [(b[0], b[2]) for b in BLOCKS if b[1] == "yaml"], ids=[b[0] for b in BLOCKS if b[1] == "yaml"]
)
def test_readme_specs_validate(ident: str, body: str) -> None:
    spec = load_spec_text(body, f"README.md {ident}")
    assert spec.tuners or spec.trainable


def test_readme_tuner_table_is_the_registrys() -> None:
    text = README.read_text()
    table = text.split("<!-- tuners-table:start -->\n", 1)[1].split("<!-- tuners-table:end -->", 1)[0]
    assert table == kinds_markdown(), "regenerate it: make docs (utune tuners --format markdown)"

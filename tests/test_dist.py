"""utune as a distribution: the wheel carries every file of ``specs/`` and ``quickstart/``, one version
everywhere, clean metadata; the built-in specs as a user meets them (``utune specs``, names that work
wherever a spec path does, a file here winning, ``specs cp``).

The wheel is built once for the module (``python -m build --no-isolation``: this venv's setuptools, offline)
and, besides being inspected, unpacked and run (``python -m utune`` with only the unpacked wheel on the
path), so the installed layout (``utune/_data/``) is what answers. ``.ci/wheel-check`` goes further in CI:
a fresh virtualenv, training steps, an export and the quickstart.
"""

from __future__ import annotations

import email
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import utune
from tests.test_cli_user import env_for, ok
from tests.test_cli_user import utune as utune_cmd
from tests.test_specs_reference import EXPECTED
from utune.runs import catalog as specs_index
from utune.spec import catalog as specs_catalog

REPO = Path(__file__).resolve().parents[1]


def repo_files() -> list[str]:
    """The files of specs/ and quickstart/ as the repository has them (git's list; else the folders)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "specs", "quickstart"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    if listed:
        return sorted(listed)
    return sorted(
        p.relative_to(REPO).as_posix()
        for d in ("specs", "quickstart")
        for p in (REPO / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    [whl] = dist.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(root)
    return root


def metadata(wheel: Path) -> email.message.Message:
    z = zipfile.ZipFile(wheel)
    [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(z.read(name))


# ---- the wheel ----------------------------------------------------------------------------------------


def test_the_wheel_holds_every_file_of_specs_and_quickstart(wheel: Path) -> None:
    shipped = sorted(
        n.removeprefix("utune/_data/") for n in zipfile.ZipFile(wheel).namelist() if n.startswith("utune/_data/")
    )
    assert shipped == repo_files()
    names = zipfile.ZipFile(wheel).namelist()
    assert "utune/_specs_index.json" in names and "utune/cli/specs.py" in names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]


def test_one_version_everywhere(wheel: Path, tmp_path: Path) -> None:
    version = utune.__version__
    assert metadata(wheel)["Version"] == version
    assert wheel.name.startswith(f"utune-{version}-")
    r = ok(utune_cmd("--version", cwd=tmp_path))
    assert r.out.strip() == f"utune {version}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.M)
    base = re.match(r"\d+\.\d+\.\d+", version)
    assert base is not None
    if ".dev" in version:  # a development version: the changes since the last release wait under [Unreleased]
        assert "## [Unreleased]" in changelog
        assert released and _tuple(released[0]) < _tuple(base.group(0)), (released[0], version)
    else:
        assert released and released[0] == version, "CHANGELOG.md: the newest release heading is this version"


def _tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def test_metadata_license_extras_and_twine_check(dist: Path, wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zipfile.ZipFile(wheel).namelist())
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"peft", "tensorboard", "models", "deploy", "test", "dev"} <= extras
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("peft") and 'extra == "peft"' in r for r in requires)
    assert any(r.startswith("onnxruntime") and 'extra == "deploy"' in r for r in requires)
    assert meta.get_all("Classifier") and meta.get_all("Project-URL")
    entry = zipfile.ZipFile(wheel).read(f"utune-{utune.__version__}.dist-info/entry_points.txt").decode()
    assert "utune = utune.cli:main" in entry
    [sdist] = dist.glob("*.tar.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.count("PASSED") == 2, proc.stdout + proc.stderr


def test_the_unpacked_wheel_reads_its_own_specs(unpacked: Path, tmp_path: Path) -> None:
    """Only the unpacked wheel on the path (no checkout): the built-ins come from utune/_data/."""
    env = env_for(tmp_path, PYTHONPATH=str(unpacked))
    r = subprocess.run(
        [sys.executable, "-m", "utune", "specs", "--format", "json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert all(row["path"].startswith(str(unpacked / "utune" / "_data")) for row in rows)
    assert {row["name"] for row in rows if row["group"] == "reference"} == {k.removesuffix(".yaml") for k in EXPECTED}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import utune.spec.catalog as c, utune.runs.catalog as i; print(c.roots().installed, i.stale())",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "True []", r.stderr


# ---- the index of counts ------------------------------------------------------------------------------


def test_the_index_is_current_and_agrees_with_the_tested_counts() -> None:
    stale = specs_index.stale()
    assert stale == [], f"{stale} changed: rewrite the index with `make docs` (python -m utune.runs.catalog)"
    index = json.loads(specs_catalog.INDEX.read_text())["specs"]
    for name, (trainable, _) in EXPECTED.items():  # tests/test_specs_reference.py builds each for real
        assert index[name.removesuffix(".yaml")]["trainable"] == trainable, name


def test_a_changed_spec_is_counted_on_the_spot(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = specs_catalog.find("quickstart/linear")
    index = json.loads(specs_catalog.INDEX.read_text())["specs"]
    index["quickstart/linear"] = {**index["quickstart/linear"], "sha256": "0" * 64, "trainable": 1}
    row = specs_index.describe(entry, index)
    assert row["trainable"] == 970  # built on meta, not the stale number


def test_header_fields() -> None:
    text = specs_catalog.find("vit_b16_cifar100/utuning_dual").path.read_text()
    assert specs_catalog.method_of(text) == "U-Tuning/12, Dual U-Tuner"
    assert specs_catalog.papers_of(text) == ["2303.00690"]
    clip = specs_catalog.find("vit_b16_clip_cifar100/adapter").path.read_text()
    assert specs_catalog.papers_of(clip) == ["2303.00690"]  # not the backbone's (CLIP, 2103.00020)
    assert specs_catalog.papers_of(specs_catalog.find("resnet50_cifar100/lora").path.read_text()) == []


# ---- the built-in specs from the command line --------------------------------------------------------


def test_specs_lists_every_reference_spec_with_its_count(tmp_path: Path) -> None:
    rows = ok(utune_cmd("specs", "--format", "json", cwd=tmp_path)).json()
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    for name, (trainable, _) in EXPECTED.items():
        row = by_name[name.removesuffix(".yaml")]
        assert row["trainable"] == trainable and Path(row["path"]).is_file()
    assert by_name["vit_b16_cifar100/lora"]["mergeable"] is True and by_name["quickstart/lora"]["group"] == "quickstart"
    assert by_name["vit_b16_cifar100/adapter"]["mergeable"] is False
    grep = ok(utune_cmd("specs", "--grep", "vit_l14*", "--format", "json", cwd=tmp_path)).json()
    assert isinstance(grep, list) and len(grep) == 5
    word = ok(utune_cmd("specs", "--grep", "vera", cwd=tmp_path, env=env_for(tmp_path, COLUMNS="200")))
    assert "vit_b16_cifar100/vera" in word.out and "101,476" in word.out and "vit_b16_cifar100/lora " not in word.out


def test_apply_a_builtin_name_from_an_empty_folder(tmp_path: Path) -> None:
    r = ok(
        utune_cmd(
            "apply", "resnet50_cifar100/lora", "model.pretrained=false", "--dry-run", "--format", "json", cwd=tmp_path
        )
    )
    doc = r.json()
    assert isinstance(doc, dict) and doc["trainable_params"] == EXPECTED["resnet50_cifar100/lora.yaml"][0]
    assert "spec resnet50_cifar100/lora: the built-in one" in r.err
    # the repository-relative path a README gives works from any folder (it is not here: the built-in is used)
    r = ok(utune_cmd("apply", "quickstart/methods/lora.yaml", "--dry-run", "--format", "json", cwd=tmp_path))
    assert "spec quickstart/lora: the built-in one" in r.err
    assert r.json()["trainable_params"] == 19_402  # type: ignore[index]


def test_a_file_here_wins_over_the_builtin_and_the_output_says_so(tmp_path: Path) -> None:
    ok(utune_cmd("specs", "cp", "quickstart/utuning", "quickstart/utuning.yaml", cwd=tmp_path))
    local = tmp_path / "quickstart" / "utuning.yaml"
    local.write_text(local.read_text().replace("num_classes: 10", "num_classes: 5"))  # head 970 -> 485
    mine = ok(utune_cmd("apply", "quickstart/utuning.yaml", "--dry-run", "--format", "json", cwd=tmp_path))
    assert "the file in this folder, not the built-in quickstart/utuning" in mine.err
    builtin = ok(utune_cmd("apply", "quickstart/utuning", "--dry-run", "--format", "json", cwd=tmp_path))
    assert "spec quickstart/utuning: the built-in one" in builtin.err
    assert builtin.json()["trainable_params"] - mine.json()["trainable_params"] == 485  # type: ignore[index]


def test_ambiguous_and_unknown_names_are_one_clear_error(tmp_path: Path) -> None:
    r = utune_cmd("apply", "lora", "--dry-run", cwd=tmp_path)
    assert r.code == 2 and "Traceback" not in r.err
    assert "'lora' names 3 built-in specs" in r.err and "resnet50_cifar100/lora" in r.err
    r = utune_cmd("apply", "vit_b16_cifar100/lorra", "--dry-run", cwd=tmp_path)
    assert r.code == 2 and "did you mean vit_b16_cifar100/lora" in r.err
    r = utune_cmd("compare", "adapter", "lora", cwd=tmp_path)
    assert r.code == 2 and "built-in specs" in r.err
    r = utune_cmd("specs", "show", "nope", cwd=tmp_path)
    assert r.code == 2 and "no built-in spec named 'nope'" in r.err and "utune specs" in r.err


def test_specs_show_prints_the_file_with_its_header(tmp_path: Path) -> None:
    r = ok(utune_cmd("specs", "show", "adaptformer", cwd=tmp_path))  # a short name, unambiguous
    assert r.out == (REPO / "specs" / "vit_b16_cifar100" / "adaptformer.yaml").read_text()
    assert r.out.startswith("# AdaptFormer")
    shown = ok(utune_cmd("spec", "show", "vit_b16_cifar100/adaptformer", cwd=tmp_path))
    assert shown.out == r.out


def test_specs_cp_writes_an_editable_copy_and_refuses_to_overwrite(tmp_path: Path) -> None:
    r = ok(utune_cmd("specs", "cp", "quickstart/lora", cwd=tmp_path))
    copy = tmp_path / "lora.yaml"
    assert "wrote lora.yaml" in r.out and "model.pretrained made absolute" in r.out
    backbone = REPO / "quickstart" / "vit_fmnist6.safetensors"
    assert f"pretrained: {backbone}" in copy.read_text()  # the relative path, made absolute
    source = (REPO / "quickstart" / "methods" / "lora.yaml").read_text()
    assert copy.read_text() == source.replace("pretrained: ../vit_fmnist6.safetensors", f"pretrained: {backbone}")
    again = utune_cmd("specs", "cp", "quickstart/lora", cwd=tmp_path)
    assert again.code == 2 and "exists: not overwritten" in again.err and "--force" in again.err
    copy.write_text(copy.read_text().replace("rank: 8", "rank: 4"))  # edit it: the copy is the user's now
    doc = ok(utune_cmd("apply", "lora.yaml", "--dry-run", "--format", "json", cwd=tmp_path)).json()
    assert isinstance(doc, dict) and doc["trainable_params"] == 19_402 - 6 * 2 * (4 * 96 + 96 * 4)
    (tmp_path / "mine").mkdir()
    r = ok(utune_cmd("specs", "cp", "vit_b16_cifar100/vera", "mine", "--format", "json", cwd=tmp_path))
    assert r.json() == {  # type: ignore[comparison-overlap]
        "name": "vit_b16_cifar100/vera",
        "source": str(REPO / "specs" / "vit_b16_cifar100" / "vera.yaml"),
        "path": "mine/vera.yaml",
        "rewritten": [],
    }
    ok(utune_cmd("specs", "cp", "quickstart/lora", "--force", cwd=tmp_path))


def test_other_commands_take_builtin_names(tmp_path: Path) -> None:
    from utune.cli.multitask import parse_tasks

    tasks, overrides = parse_tasks(["adaptformer", "mine=quickstart/lora", "tuners.0.kind=vera", "mine:train.lr=1"])
    assert tasks == {
        "adaptformer": REPO / "specs" / "vit_b16_cifar100" / "adaptformer.yaml",
        "mine": REPO / "quickstart" / "methods" / "lora.yaml",
    }
    assert overrides["mine"] == ["tuners.0.kind=vera", "train.lr=1"]
    r = ok(utune_cmd("spec", "validate", "quickstart/lora", "vit_b16_cifar100/vera", "--format", "json", cwd=tmp_path))
    assert [d["ok"] for d in r.json()] == [True, True]  # type: ignore[union-attr]
    r = ok(utune_cmd("inspect", "quickstart/lora", "--grep", "blocks.0.attn.qkv", "--format", "json", cwd=tmp_path))
    assert [row["rules"] for row in r.json()] == [["lora"]]  # type: ignore[union-attr]


def test_the_python_api_takes_builtin_names_too() -> None:
    spec = utune.load_spec("quickstart/lora")
    assert spec.source_path == REPO / "quickstart" / "methods" / "lora.yaml"
    assert spec.model.pretrained == str(REPO / "quickstart" / "vit_fmnist6.safetensors")

"""Kinds from the user's own code, used as a person uses them: the `utune` command in a subprocess from an
empty folder, with the example package of docs/adding-a-kind.md (examples/kinds/my_kinds) copied into a
temporary folder on PYTHONPATH (not under utune/).

A kind named by import path, a foldable one, and `kind: module` each go through apply --dry-run --verify,
--train, export (--tuners-only, --merge with a strict timm load) and apply --tuners; an installed package
publishes kinds through the `utune.kinds` entry-point group (a real .dist-info folder, as pip writes it);
`utune tuners check` runs the contract kit and names a broken kind's failing contract; what cannot be
imported, or is named only inside a data file, is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.test_cli_user import REPO, Result, env_for, ok, utune

EXAMPLE = REPO / "examples" / "kinds"
TRAIN = """\
data: {dataset: digits, augment: false, num_workers: 0}
train: {epochs: 1, max_steps: 4, batch_size: 64, log_every: 2, lr: 0.01}
"""

BROKEN = '''\
"""A kind that says it is the identity at init and is not (its last layer starts random)."""
from torch import nn
from utune.kinds import Tap, TunerKind


class NotIdentity(TunerKind):
    summary = "a deliberately broken kind"

    def build(self, site, ctx):
        c_in, c_out = ctx.shape(site, Tap("input"))[-1], ctx.output_shape(site)[-1]
        return nn.Sequential(nn.Linear(c_in, 4), nn.Linear(4, c_out))
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder on PYTHONPATH holding the example package, a broken kind, and the package's install record."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(EXAMPLE / "my_kinds", root / "my_kinds", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "broken_kinds.py").write_text(BROKEN)
    info = root / "my_kinds-0.1.0.dist-info"  # what `pip install examples/kinds` records: its entry points
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-kinds\nVersion: 0.1.0\n")
    eps = (EXAMPLE / "pyproject.toml").read_text().split('[project.entry-points."utune.kinds"]\n')[1].split("\n\n")[0]
    (info / "entry_points.txt").write_text("[utune.kinds]\n" + eps.replace('"', "") + "\n")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Path:
    d = tmp_path_factory.mktemp("kinds")
    for name in ("gated.yaml", "linear.yaml", "module.yaml"):
        (d / name).write_text((EXAMPLE / name).read_text() + TRAIN)
    return d


def run(*args: str, cwd: Path, site: Path, **env: str) -> Result:
    """``utune ARGS`` with the example package on PYTHONPATH. A run folder's spec.yaml is a data file: its
    kinds are imported only with ``--trust`` (the user names the package), as for model factories."""
    return utune(*args, cwd=cwd, env=env_for(cwd, PYTHONPATH=f"{REPO}{os.pathsep}{site}", **env))


def refused(r: Result, *needles: str) -> str:
    assert r.code == 2, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "Traceback" not in r.out + r.err
    for needle in needles:
        assert needle in r.err, f"{needle!r} not in:\n{r.err}"
    return r.err


def test_a_kind_named_by_import_path_trains_exports_and_loads_back(work: Path, site: Path) -> None:
    rep = ok(run("apply", "gated.yaml", "--dry-run", "--verify", "--format", "json", cwd=work, site=site)).json()
    assert isinstance(rep, dict)
    [rule] = rep["tuners"]
    assert rule["kind"] == "my_kinds.kinds:GatedAdapter" and len(rule["sites"]) == 6
    assert rule["identity_at_init"] is True and rep["identity_max_abs_diff"] == 0.0  # tanh(0) = 0: bit-exact
    ok(run("apply", "gated.yaml", "--train", "--out", "run_gated", cwd=work, site=site))
    doc = ok(
        run("--trust", "my_kinds", "export", "run_gated", "--tuners-only", "--format", "json", cwd=work, site=site)
    ).json()
    assert isinstance(doc, dict) and doc["tensors"] == 6 * 5 + 2  # down, up (weight, bias), gate per site; head
    args = ("apply", "gated.yaml", "--tuners", doc["path"], "--dry-run", "--verify", "--format", "json")
    loaded = ok(run(*args, cwd=work, site=site)).json()
    assert isinstance(loaded, dict) and loaded["identity_max_abs_diff"] > 0  # the trained gates, not the init
    ok(run("draw", "gated.yaml", "-o", "gated.png", cwd=work, site=site))
    assert (work / "gated.png").stat().st_size > 1000
    merge = run(
        "--trust", "my_kinds", "export", "run_gated", "--merge", cwd=work, site=site
    )  # GELU: it declares no fold
    refused(merge, "cannot merge", "gated")


def test_a_folding_kind_merges_into_weights_a_plain_timm_model_loads(work: Path, site: Path) -> None:
    ok(run("apply", "linear.yaml", "--train", "--out", "run_linear", cwd=work, site=site))
    doc = ok(
        run("--trust", "my_kinds", "export", "run_linear", "--merge", "--format", "json", cwd=work, site=site)
    ).json()
    assert isinstance(doc, dict) and doc["verify"]["ok"] is True
    plain = timm.create_model("test_vit", num_classes=10, img_size=32)
    state = load_file(str(work / doc["path"]) if not Path(doc["path"]).is_absolute() else doc["path"])
    plain.load_state_dict(state, strict=True)
    base = timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()
    changed = [k for k in state if "qkv.weight" in k and not torch.equal(state[k], base[k])]
    assert len(changed) == 6  # every qkv took its adapter


def test_kind_module_takes_a_plain_nn_module_through_the_same_chain(work: Path, site: Path) -> None:
    args = ("apply", "module.yaml", "--train", "--verify", "--out", "run_module", "--format", "json")
    trained = ok(run(*args, cwd=work, site=site)).json()  # --verify: measured at init, before training
    assert isinstance(trained, dict)
    rep = trained["report"]
    [rule] = rep["tuners"]
    assert rule["kind"] == "module" and rule["identity_at_init"] is None  # the module decides; --verify measures
    assert rep["identity_max_abs_diff"] == 0.0  # Bottleneck zero-inits its last layer
    assert rule["params"] == 6 * (64 * 4 + 4 + 4 * 64 + 64 + 64)  # down, up, the per-channel scale
    doc = ok(
        run("--trust", "my_kinds", "export", "run_module", "--tuners-only", "--format", "json", cwd=work, site=site)
    ).json()
    assert isinstance(doc, dict)
    args = ("apply", "module.yaml", "--tuners", doc["path"], "--dry-run", "--verify", "--format", "json")
    loaded = ok(run(*args, cwd=work, site=site)).json()
    assert isinstance(loaded, dict) and loaded["identity_max_abs_diff"] > 0


def test_an_installed_package_publishes_kinds_by_entry_point(work: Path, site: Path) -> None:
    rows = ok(run("tuners", "--format", "json", cwd=work, site=site)).json()
    assert isinstance(rows, list)
    by_name = {r["kind"]: r for r in rows}
    assert by_name["gated_adapter"]["source"] == "entry point (my-kinds)"
    assert by_name["linear_adapter"]["mergeable"] is True and by_name["lora"]["source"] == "utune"
    assert by_name["module"]["options"]["class"]["required"] is True
    (work / "published.yaml").write_text(
        (work / "gated.yaml").read_text().replace("my_kinds.kinds:GatedAdapter", "gated_adapter")
    )
    rep = ok(run("apply", "published.yaml", "--dry-run", "--format", "json", cwd=work, site=site)).json()
    assert isinstance(rep, dict) and rep["tuners"][0]["kind"] == "gated_adapter"


def test_tuners_check_runs_the_kit_and_names_a_broken_kinds_contract(work: Path, site: Path) -> None:
    good = run(
        "tuners", "check", "my_kinds.kinds:LinearAdapter", "--arch", "vit", "--format", "json", cwd=work, site=site
    )
    doc = ok(good).json()
    assert isinstance(doc, dict) and doc["ok"] is True
    contracts = {r["contract"]: r["status"] for r in doc["results"]}
    assert contracts["merged == unmerged"] == "pass" and contracts["tuner-only round trip"] == "pass"
    bad = run("tuners", "check", "broken_kinds:NotIdentity", "--arch", "vit", "--format", "json", cwd=work, site=site)
    assert bad.code == 1 and "Traceback" not in bad.err
    report = json.loads(bad.out)
    [failure] = [r for r in report["results"] if r["status"] == "fail"]
    assert failure["arch"] == "vit" and failure["contract"] == "identity at init" and failure["value"] > 0


@pytest.mark.parametrize(
    ("kind", "option", "needles"),
    [
        ("no_such_pkg.kinds:Gated", "dim: 8", ["bad.yaml:7", "no module named 'no_such_pkg'"]),
        ("my_kinds.kinds:Nope", "dim: 8", ["bad.yaml:7", "has no attribute 'Nope'"]),
        ("my_kinds.mods:Bottleneck", "dim: 8", ["bad.yaml:7", "not a subclass of utune.kinds.TunerKind"]),
        ("module", "class: my_kinds.kinds:GatedAdapter", ["bad.yaml:9", "not a torch.nn.Module subclass"]),
        ("gated_adaptr", "dim: 8", ["bad.yaml:7", "unknown tuner kind 'gated_adaptr'", "did you mean gated_adapter"]),
    ],
)
def test_a_kind_that_cannot_be_used_is_refused_at_its_line(
    work: Path, site: Path, kind: str, option: str, needles: list[str]
) -> None:
    text = (work / "gated.yaml").read_text().replace("my_kinds.kinds:GatedAdapter", kind)
    (work / "bad.yaml").write_text(text.replace("dim: 8 ", option + " "))
    refused(run("apply", "bad.yaml", "--dry-run", cwd=work, site=site), *needles)


def test_a_kind_named_only_inside_a_tuner_file_is_not_imported(work: Path, site: Path) -> None:
    """A tuner file's embedded spec is data: a fresh process refuses the import path it names, unless the user
    names it (UTUNE_TRUST)."""
    tuners = work / "run_gated" / "export" / "tuners.safetensors"
    if not tuners.exists():
        pytest.skip("needs the export of test_a_kind_named_by_import_path_trains_exports_and_loads_back")
    code = (
        "import sys\nfrom utune.export.tuners_only import read_tuners\nfrom utune.spec import load_spec_text\n"
        f"_, meta = read_tuners({str(tuners)!r})\n"
        "try:\n    load_spec_text(meta['utune.spec'], 'tuners.safetensors', trusted=False)\n"
        "except Exception as e:\n    print(type(e).__name__, str(e).splitlines()[1] if '\\n' in str(e) else e)\n"
        "else:\n    print('loaded')\n"
        "print('imported' if 'my_kinds' in sys.modules else 'not imported')\n"
    )
    env = env_for(work, PYTHONPATH=f"{REPO}{os.pathsep}{site}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert "SpecError" in proc.stdout and "utune imports only code you named" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("not imported")
    env["UTUNE_TRUST"] = "my_kinds"
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["loaded", "imported"], proc.stdout + proc.stderr

"""Your own model from the command line: ``model.name: mynets.nets:make_net`` (a factory in a package on
PYTHONPATH, as a user's own code is) or a name a package publishes in the ``utune.models`` entry points,
typed as a person types the commands (a subprocess from an empty folder, ``--format json`` parsed); and the
security boundary: a factory named only by a data file (a run's spec.yaml, a tuner file's embedded spec, a
PEFT folder) is never imported or called.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, safe_open, save_file

from tests.test_cli_user import REPO, Result, env_for, files, ok, utune

NETS = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc1 = nn.Linear(width, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).relu().mean((2, 3))
        return self.head(self.fc1(x).relu())


def make_net(num_classes: int = 10, width: int = 8) -> Net:
    return Net(num_classes, width)
"""

SPEC = """\
version: 1
model: {name: "mynets.nets:make_net", kwargs: {width: 16}, img_size: 16}
tuners:
  - {name: lora, kind: lora, at: fc1, rank: 4}
trainable: [head]
data: {dataset: digits, augment: false, num_workers: 0}
train: {epochs: 1, max_steps: 2, batch_size: 64, log_every: 1, lr: 0.01}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own")
    pkg = root / "site" / "mynets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    dist = root / "site" / "mynets-0.1.dist-info"  # an installed package publishing a model name
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mynets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[utune.models]\nmy-net = mynets.nets:make_net\n")
    (root / "work").mkdir()
    (root / "work" / "spec.yaml").write_text(SPEC)
    return root / "work"


def env(work: Path) -> dict[str, str]:
    e = env_for(work)
    e["PYTHONPATH"] = f"{REPO}:{work.parent / 'site'}"
    return e


def run(work: Path, *args: str) -> Result:
    return utune(*args, cwd=work, env=env(work))


def test_1_a_factory_in_every_command(work: Path) -> None:
    rows = ok(run(work, "inspect", "spec.yaml", "--format", "json")).json()
    assert isinstance(rows, list) and [r["path"] for r in rows if r["op"] == "module"] == ["conv", "fc1", "head"]
    report = ok(run(work, "apply", "spec.yaml", "model.name=my-net", "--format", "json")).json()  # entry point
    assert isinstance(report, dict) and report["model"] == "my-net"
    doc = ok(run(work, "apply", "spec.yaml", "--train", "--out", "run", "--format", "json")).json()
    assert isinstance(doc, dict) and doc["report"]["model"] == "mynets.nets:make_net"
    assert doc["report"]["tuner_params"] == 4 * (16 + 32)
    refused = run(work, "eval", "run")  # the run's spec.yaml is a data file: its factory is not imported
    assert refused.code == 2 and "Traceback" not in refused.err
    assert "run/spec.yaml" in refused.err and "utune --trust mynets.nets" in refused.err
    result = ok(run(work, "--trust", "mynets", "eval", "run", "--format", "json")).json()
    assert isinstance(result, dict) and result["n"] == 360
    merged = ok(run(work, "--trust", "mynets", "export", "run", "--merge", "--format", "json")).json()
    assert isinstance(merged, dict) and merged["verify"]["ok"] is True
    state = load_file(str(work / "run" / "export" / "merged.safetensors"))
    sys.path.insert(0, str(work.parent / "site"))
    try:
        from mynets.nets import Net  # type: ignore[import-not-found]

        Net(10, 16).load_state_dict(state, strict=True)  # keyed like the user's own module
    finally:
        sys.path.remove(str(work.parent / "site"))
    ok(run(work, "--trust", "mynets.nets:make_net", "export", "run", "--tuners-only", "-o", "t.safetensors"))
    loaded = ok(run(work, "apply", "spec.yaml", "--tuners", "t.safetensors", "--format", "json")).json()
    assert isinstance(loaded, dict) and loaded["tuners_file"] == "t.safetensors"


def test_2_multitask(work: Path) -> None:
    ok(run(work, "multitask", "a=spec.yaml", "b=spec.yaml", "--steps", "1", "--out", "mt", "--format", "json"))
    assert {"a/spec.yaml", "b/spec.yaml"} <= {f.removeprefix("mt/") for f in files(work) if f.startswith("mt/")}


def test_3_factory_errors_say_what_could_not_be_imported(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run(work, "apply", "spec.yaml", "model.name=mynets.nope:make_net")
    assert r.code == 2 and "cannot import 'mynets.nope'" in r.err and "Traceback" not in r.err
    import utune
    from utune.errors import UserInputError

    monkeypatch.syspath_prepend(str(work.parent / "site"))
    spec = yaml.safe_load(SPEC)
    with pytest.raises(UserInputError, match="has no attribute 'make_nett'") as e:
        utune.build(spec, ["model.name=mynets.nets:make_nett"])
    assert "make_net" in (e.value.hint or "")
    with pytest.raises(UserInputError, match="could not be called") as e:
        utune.build(spec, ["model.kwargs.depth=3"])
    assert "(num_classes: int = 10, width: int = 8)" in (e.value.hint or "")
    with pytest.raises(UserInputError, match="input size of Net is unknown"):
        utune.build(spec, ["model.img_size=null"])


def test_4_a_factory_named_only_by_a_data_file_runs_nothing(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import utune
    from utune._imports import UntrustedCodeError
    from utune.engine.sets import build_sets
    from utune.export.run import export

    marker = work / "PWNED"
    evil = yaml.safe_load(SPEC)
    evil["model"] = {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}
    # a tuner file whose embedded spec names os:system
    with safe_open(str(work / "t.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    meta["utune.spec"] = yaml.safe_dump(evil)
    save_file(tensors, str(work / "evil.safetensors"), metadata=meta)
    # a run folder whose spec.yaml names it
    shutil.copytree(work / "run", work / "evil_run")
    (work / "evil_run" / "spec.yaml").write_text(yaml.safe_dump(evil))
    # a PEFT folder whose config names it as its base model
    monkeypatch.syspath_prepend(str(work.parent / "site"))
    export(utune.build(work / "spec.yaml"), "peft", work / "peft", verify=False)
    config = json.loads((work / "peft" / "adapter_config.json").read_text())
    (work / "peft" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "os:system"}))

    assert "os:system" in ok(run(work, "spec", "show", "evil.safetensors")).out
    ok(run(work, "apply", "spec.yaml", "--tuners", "evil.safetensors"))  # the user's spec builds; the file's is data
    ok(run(work, "import-peft", "peft", "--spec", "spec.yaml", "-o", "imported.safetensors", "--no-verify"))
    for r in (run(work, "eval", "evil_run"), run(work, "export", "evil_run", "--merge")):
        assert r.code == 2 and "Traceback" not in r.err
        assert "'os:system' in evil_run/spec.yaml names code to import" in r.err
    with pytest.raises(UntrustedCodeError, match="embedded spec"):
        build_sets({"evil": work / "evil.safetensors"})
    assert not marker.exists()

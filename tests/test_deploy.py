"""Deployment artifacts (``utune export --onnx`` / ``--torch-export``) run without utune.

Each case is trained a few real steps (every tuner far from its identity init), exported in both formats,
and then run in a separate Python process in which ``import utune`` fails (``python -S`` with only the
venv's site-packages on the path: the editable install's ``.pth`` hook is never read): onnxruntime and
``torch.export.load`` must reproduce the tuned model's outputs within 1e-4 of their scale at two batch sizes.
The example scripts of docs/deploy.md classify an image the same way (onnxruntime without torch; torch alone).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utune.engine.build import Built, build
from utune.errors import ExportError
from utune.export import deploy
from utune.export.deploy import export_deployed, read_metadata
from utune.spec import load_spec_text

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

REPO = Path(__file__).resolve().parents[1]
K = 5


def spec(name: str, tuners: list[dict[str, Any]], trainable: tuple[str, ...] = ("head",)) -> dict[str, Any]:
    model = {"name": name, "num_classes": K, "img_size": 32, "pretrained": False}
    return {"version": 1, "model": model, "tuners": tuners, "trainable": list(trainable)}


CASES: dict[str, dict[str, Any]] = {
    "utuning_dual": spec(  # the U-Tuning paper's parallel P-Adapters (GELU) on every MHA and FFN: no fold
        "test_vit",
        [
            {
                "name": "mha",
                "kind": "adapter",
                "at": "blocks.*.attn",
                "placement": "parallel",
                "tap": "parent.input",
                "dim": 4,
                "scale": "channel",
            },
            {
                "name": "ffn",
                "kind": "adapter",
                "at": "blocks.*::add_1",
                "placement": "parallel",
                "tap": "input",
                "dim": 4,
                "scale": "channel",
            },
        ],
    ),  # fmt: skip
    "lora": spec(
        "test_vit", [{"name": "lora", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 4, "slices": ["q", "v"]}]
    ),  # fmt: skip
    "vpt_deep": spec(
        "test_vit", [{"name": "prompt", "kind": "prompt", "at": "blocks.*", "placement": "concat", "length": 3}]
    ),  # fmt: skip
    "prefix": spec(
        "test_vit", [{"name": "prefix", "kind": "prefix", "at": "blocks.*.attn", "placement": "concat", "length": 3}]
    ),  # fmt: skip
    "bypass": spec("test_vit", [{"name": "bypass", "kind": "bypass", "at": "blocks.*", "dim": 4, "into": "norm"}]),
    "cnn_adapter": spec(
        "test_resnet",
        [{"name": "block", "kind": "adapter", "at": "layer*.*", "placement": "parallel", "dim": 4, "scale": "channel"}],
        ("fc",),
    ),  # fmt: skip
}
FOLDED = {"lora"}  # every other case keeps its tuners in the graph


def trained(case: str) -> Built:
    torch.manual_seed(0)
    built = build(CASES[case])
    model = built.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, *built.input_size, generator=gen)
        loss = F.cross_entropy(model(x), torch.randint(0, K, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return built


def no_utune_env() -> dict[str, str]:
    """A process that has the venv's packages but cannot import utune (see the module docstring)."""
    return {"PYTHONPATH": sysconfig.get_paths()["purelib"], "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def run_without_utune(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=no_utune_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


CHECK = """
import json, sys
import numpy as np
try:
    import utune
    sys.exit("utune is importable here: " + utune.__file__)
except ImportError:
    pass
import onnxruntime as ort
import torch
result = {}
for case in json.loads(sys.argv[1]):
    sess = ort.InferenceSession(case + ".onnx", providers=["CPUExecutionProvider"])
    extra = {"utune.json": ""}
    net = torch.export.load(case + ".pt2", extra_files=extra).module()
    meta = json.loads(extra["utune.json"])
    onnx_meta = dict(sess.get_modelmeta().custom_metadata_map)
    assert meta.pop("utune.format") == "torch-export/1" and onnx_meta.pop("utune.format") == "onnx/1"
    assert meta == onnx_meta, case
    for n in (2, 3):
        x, want = np.load(f"{case}_x{n}.npy"), np.load(f"{case}_y{n}.npy")
        got_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            got_pt2 = net(torch.from_numpy(x)).numpy()
        scale = float(np.abs(want).max())
        result[f"{case}/onnx/{n}"] = float(np.abs(got_onnx - want).max()) / scale
        result[f"{case}/pt2/{n}"] = float(np.abs(got_pt2 - want).max()) / scale
print(json.dumps({"result": result, "utune_loaded": "utune" in sys.modules}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("deploy")
    summaries: dict[str, dict[str, Any]] = {}
    for case in CASES:
        built = trained(case)
        built.model.eval()
        for n in (2, 3):
            x = torch.randn(n, *built.input_size, generator=torch.Generator().manual_seed(10 + n))
            with torch.no_grad():
                y = built.model(x)
            np.save(out / f"{case}_x{n}.npy", x.numpy())
            np.save(out / f"{case}_y{n}.npy", y.numpy())
        for fmt, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2")):
            summaries[f"{case}/{fmt}"] = export_deployed(built, fmt, out / f"{case}{suffix}")
    return out, summaries


def test_artifacts_match_the_tuned_model_without_utune(exported: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    out, summaries = exported
    proc = run_without_utune(["-c", CHECK, json.dumps(list(CASES))], out)
    report = json.loads(proc.stdout)
    assert report["utune_loaded"] is False
    assert len(report["result"]) == len(CASES) * 2 * 2  # every case, both formats, batches of 2 and 3
    bad = {k: v for k, v in report["result"].items() if not v <= 1e-4}
    assert not bad, bad
    for key, summary in summaries.items():
        assert summary["verify"].ok and summary["verify"].max_abs_diff <= summary["verify"].tolerance
        case, fmt = key.split("/")
        what = "onnxruntime" if fmt == "onnx" else "torch.export"
        assert summary["verify"].line().startswith(f"verify: max |{what} - tuned| = ")
        if case in FOLDED:
            assert summary["folded"] and not summary["kept"], key
        else:
            assert summary["kept"] and not summary["folded"], key


def test_metadata(exported: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    out, _ = exported
    for suffix in (".onnx", ".pt2"):
        meta = read_metadata(out / f"utuning_dual{suffix}")
        assert json.loads(meta["input_size"]) == [3, 32, 32]
        assert len(json.loads(meta["mean"])) == 3 and len(json.loads(meta["std"])) == 3
        assert meta["utune.version"] and meta["utune.base_model"] == "test_vit"
        assert json.loads(meta["utune.kept"]) == ["mha (adapter)", "ffn (adapter)"]
        again = load_spec_text(meta["utune.spec"], "artifact", trusted=False)
        assert [r.kind for r in again.tuners] == ["adapter", "adapter"]
        assert "class_names" not in meta  # nothing knows them: omitted, not invented
    lora = read_metadata(out / "lora.onnx")
    assert json.loads(lora["utune.folded"]) == ["lora (lora)"]


def test_folded_artifact_is_the_plain_graph(exported: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    """The merged LoRA exports as the untuned architecture: same op count as the plain model's ONNX."""
    import onnx

    out, _ = exported
    lora = onnx.load(str(out / "lora.onnx"))
    dual = onnx.load(str(out / "utuning_dual.onnx"))
    names = {i.name for i in lora.graph.initializer}
    assert not any("utune" in n or "lora" in n.lower() for n in names)
    assert len(lora.graph.node) < len(dual.graph.node)


def test_class_names_from_the_run(tmp_path: Path) -> None:
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog", "emu", "fox", "gnu"]))
    built = build(CASES["lora"])
    path = tmp_path / "m.pt2"
    export_deployed(built, "torch-export", path, source=tmp_path)
    assert json.loads(read_metadata(path)["class_names"]) == ["cat", "dog", "emu", "fox", "gnu"]


def test_failed_verify_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = trained("vpt_deep")
    monkeypatch.setattr(deploy, "relative_tolerance", lambda model: -1.0)  # no output can pass
    for fmt, name in (("onnx", "m.onnx"), ("torch-export", "m.pt2")):
        with pytest.raises(ExportError, match="does not reproduce the tuned model") as err:
            export_deployed(built, fmt, tmp_path / "sub" / name)
        assert "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_example_scripts_classify_an_image_without_utune(
    exported: tuple[Path, dict[str, dict[str, Any]]], tmp_path: Path
) -> None:
    """docs/deploy.md's scripts: the same class and probability as the tuned model on timm's eval transform."""
    import timm.data
    from PIL import Image

    out, _ = exported
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((45, 60, 3)) * 255).astype("uint8")).save(tmp_path / "img.png")
    built = trained("utuning_dual")
    x = timm.data.create_transform(**built.data_config)(Image.open(tmp_path / "img.png").convert("RGB"))
    with torch.no_grad():
        p = built.model.eval()(x[None]).softmax(-1)[0]
    probe = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__'); print(sorted(sys.modules))"
    for script, model in (("onnx_predict.py", "utuning_dual.onnx"), ("pt2_predict.py", "utuning_dual.pt2")):
        proc = run_without_utune(
            ["-c", probe, str(REPO / "examples" / "deploy" / script), str(out / model), "img.png"], tmp_path
        )
        lines = proc.stdout.strip().splitlines()
        pred, modules = json.loads(lines[0]), set(eval(lines[-1]))  # noqa: S307 - our own printed list
        assert pred["class"] == int(p.argmax()) and abs(pred["prob"] - float(p.max())) < 1e-3, (script, pred)
        assert "utune" not in modules and "timm" not in modules
        if script == "onnx_predict.py":
            assert "torch" not in modules  # only onnxruntime, numpy and Pillow


# ---- the command, typed from an empty folder --------------------------------------------------------------

DUAL_SPEC = """\
version: 1
model: {name: test_vit, img_size: 32}   # num_classes left out: digits has 10
tuners:
  - {name: mha, kind: adapter, at: blocks.*.attn, placement: parallel, tap: parent.input, dim: 4}
trainable: [head]
data: {dataset: digits, augment: false, num_workers: 0}
train: {epochs: 1, max_steps: 2, batch_size: 64, log_every: 1, lr: 0.01}
"""


def test_export_onnx_and_pt2_of_the_latest_run(tmp_path: Path) -> None:
    from tests.test_cli_user import no_temp_files, ok, utune

    (tmp_path / "spec.yaml").write_text(DUAL_SPEC)
    ok(utune("apply", "spec.yaml", "--train", cwd=tmp_path))
    [run] = list((tmp_path / "runs").iterdir())
    for flag, name in (("--onnx", "model.onnx"), ("--torch-export", "model.pt2")):
        r = ok(utune("export", flag, "--format", "json", cwd=tmp_path))
        result = r.json()
        assert isinstance(result, dict)
        assert Path(result["path"]) == Path("runs") / run.name / "export" / name
        assert result["kept"] == ["mha (adapter)"] and result["folded"] == []
        assert result["verify"]["ok"] and result["verify"]["max_abs_diff"] <= result["verify"]["tolerance"]
        assert (run / "export" / name).stat().st_size == result["bytes"]
        assert result["why_kept"].startswith("cannot merge these tuners into the base weights: mha (adapter)")
    for args, message in (
        (["export", "--onnx"], "already exists"),
        (["export", "--onnx", "--merge", "-o", "x.onnx"], "--merge and --onnx exclude each other"),
        (["export", "--torch-export", "--folder", "-o", "x"], "--folder goes with --merge or --tuners-only"),
    ):
        r = utune(*args, cwd=tmp_path)
        assert r.code == 2 and message in r.err and "Traceback" not in r.err, (args, r.err)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x").exists()
    no_temp_files(tmp_path)

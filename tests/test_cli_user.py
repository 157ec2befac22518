"""The `utune` command typed as a person types it: a subprocess from an empty folder, default paths,
relative paths, piped (non-tty) output, `--format json` parsed, exit codes, no tracebacks, and the
files each command leaves behind.

The chain follows the README: apply --train (no --out) -> eval -> export --merge / --tuners-only /
--peft -> apply --tuners. The model is timm's tiny `test_vit` at 32 px on scikit-learn's digits (offline).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("utune")

SPEC = """\
version: 1
model: {name: test_vit, img_size: 32}   # num_classes left out: digits has 10
tuners:
  - {name: lora, kind: lora, at: "blocks.*.attn.qkv", rank: 4, slices: [q, v]}
trainable: [head]
data: {dataset: digits, augment: false, num_workers: 0}
train: {epochs: 1, max_steps: 4, batch_size: 64, log_every: 2, lr: 0.01}
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)  # the whole of stdout: exactly one JSON document


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("UTUNE_QUIET", "UTUNE_DEBUG", "WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", UTUNE_DATA=str(tmp / "data"), COLUMNS="200")
    env.update(extra)
    return env


def utune(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "utune"]
    proc = subprocess.run(
        [*cmd, *args],
        cwd=cwd,
        env=env or env_for(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(r: Result) -> Result:
    assert r.code == 0, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "Traceback" not in r.out + r.err
    return r


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def no_temp_files(root: Path) -> None:
    left = [f for f in files(root) if ".tmp" in f]
    assert not left, f"temp files left behind: {left}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("user")
    (d / "spec.yaml").write_text(SPEC)
    return d


def run_dirs(work: Path) -> list[Path]:
    return sorted((work / "runs").glob("spec-*"))


# ---- the README's chain, in order ------------------------------------------------------------------------


def test_1_apply_train_with_no_out_writes_runs_spec_time(work: Path) -> None:
    r = ok(utune("apply", "spec.yaml", "--train", cwd=work))
    [run] = run_dirs(work)
    assert {"spec.yaml", "metrics.jsonl", "summary.json", "checkpoints/latest.txt"} <= files(run)
    assert "training summary" in r.out and f"runs/{run.name}" in r.out
    assert "num_classes = 10" in r.out  # the default from the dataset, said in the report
    assert "step 2/4" in r.err and "val acc" in r.err  # progress lines on stderr when it is not a terminal
    assert not (work / "None").exists()
    no_temp_files(work)


def test_2_eval_defaults_to_the_latest_run_and_scores_every_image(work: Path) -> None:
    r = ok(utune("eval", "--format", "json", cwd=work))
    result = r.json()
    assert isinstance(result, dict) and result["n"] == 360 and 0 <= result["acc"] <= 1
    assert "using the latest run" in r.err
    train = ok(utune("eval", "--split", "train", "--format", "json", cwd=work)).json()
    assert isinstance(train, dict) and train["n"] == 1437  # every image: the evaluation transform, no dropped tail
    best = ok(utune("eval", str(run_dirs(work)[0]), "--checkpoint", "best", cwd=work))
    assert "test accuracy" in best.out


def test_3_export_merge_with_no_run_takes_the_latest(work: Path) -> None:
    [run] = run_dirs(work)
    r = ok(utune("export", "--merge", cwd=work))
    assert f"using the latest run: runs/{run.name}" in r.err and "verify:" in r.out
    merged = run / "export" / "merged.safetensors"
    plain = timm.create_model("test_vit", num_classes=10, img_size=32)
    plain.load_state_dict(load_file(str(merged)), strict=True)  # a plain timm model loads it as it is
    r = ok(utune("export", "--merge", "--format", "json", "-o", "out/deep/merged.safetensors", cwd=work))
    doc = r.json()
    assert isinstance(doc, dict) and doc["mode"] == "merge" and doc["verify"]["ok"] is True
    assert (work / "out" / "deep" / "merged.safetensors").is_file()  # -o created the folders
    no_temp_files(work)


def test_4_export_tuners_only_and_peft_then_apply_tuners(work: Path) -> None:
    [run] = run_dirs(work)
    doc = ok(utune("export", "--tuners-only", "--format", "json", cwd=work)).json()
    assert isinstance(doc, dict) and doc["path"] == f"runs/{run.name}/export/tuners.safetensors"
    r = ok(utune("export", "--peft", "-o", "peft_lora", cwd=work))  # q/v slices: rank 2r on the fused qkv
    assert "PEFT LoRA folder" in r.out and "verify:" in r.out
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files(work / "peft_lora")
    tuners = f"runs/{run.name}/export/tuners.safetensors"
    report = ok(utune("apply", "spec.yaml", "--tuners", tuners, "--dry-run", "--verify", "--format", "json", cwd=work))
    rep = report.json()
    assert isinstance(rep, dict) and rep["identity_max_abs_diff"] > 0  # the trained tuners, not the init
    # an option that changes no weight (LoRA's dropout) does not stop the file from loading
    ok(utune("apply", "spec.yaml", "tuners.0.dropout=0.1", "--tuners", tuners, "--dry-run", cwd=work))
    spec_text = ok(utune("spec", "show", tuners, cwd=work)).out
    assert spec_text.startswith("# resolved by utune") and "slices:" in spec_text
    assert ok(utune("export", "--show-spec", tuners, cwd=work)).out == spec_text
    no_temp_files(work)


def test_5_apply_train_json_is_one_document_and_a_second_run_gets_its_own_folder(work: Path) -> None:
    r = ok(utune("apply", "spec.yaml", "--train", "--format", "json", cwd=work))
    doc = r.json()
    assert isinstance(doc, dict) and {"run", "report", "summary"} <= set(doc)
    assert doc["summary"]["step"] == 4 and doc["report"]["num_outputs"] == 10
    assert len(run_dirs(work)) == 2


def test_6_resume_refuses_a_changed_spec_and_keeps_the_recorded_one(work: Path) -> None:
    run = run_dirs(work)[-1]
    recorded = (run / "spec.yaml").read_bytes()
    r = utune("apply", "spec.yaml", "--train", "--resume", "train.lr=0.5", "train.epochs=3", cwd=work)
    assert r.code == 2 and "Traceback" not in r.err
    assert "train.lr: 0.01 in the run, 0.5 now" in r.err and "train.epochs" in r.err and "data.root" in r.err
    assert (run / "spec.yaml").read_bytes() == recorded
    r = ok(utune("apply", "spec.yaml", "--train", "--resume", "train.log_every=1", cwd=work))
    assert f"resuming runs/{run.name}" in r.err and "train.log_every" in r.err
    assert (run / "spec.yaml").read_bytes() == recorded


def test_7_inspect_tuners_and_validate_print_json(work: Path) -> None:
    rows = ok(utune("inspect", "spec.yaml", "--spec", "spec.yaml", "--format", "json", cwd=work)).json()
    assert isinstance(rows, list) and any(r["rules"] == ["lora"] for r in rows)
    r = ok(utune("inspect", "test_vit", "--spec", "spec.yaml", cwd=work))
    assert "rule lora (lora): 2 site(s)" in r.out or "rule lora (lora): 6 site(s)" in r.out
    kinds = ok(utune("tuners", "--format", "json", cwd=work)).json()
    assert isinstance(kinds, list) and all(isinstance(k["mergeable"], bool) for k in kinds)
    checks = ok(utune("spec", "validate", "spec.yaml", "--model", "--format", "json", cwd=work)).json()
    assert isinstance(checks, list) and checks[0]["ok"] and "selectors" in checks[0]["checked"]
    assert "add --model" in ok(utune("spec", "validate", "spec.yaml", cwd=work)).out
    version = ok(utune("--version", cwd=work)).out
    assert version.strip().startswith("utune ")


def test_8_a_spec_elsewhere_with_relative_weights_works_from_any_folder(work: Path, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(proj / "backbone.safetensors"))
    text = SPEC.replace("model: {name: test_vit, img_size: 32}", "model: {name: test_vit, img_size: 32, "
                        "pretrained: ../backbone.safetensors}")  # fmt: skip
    (proj / "configs" / "s.yaml").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok(utune("apply", "../proj/configs/s.yaml", "--train", "--out", "r", cwd=elsewhere))
    assert str(proj / "backbone.safetensors") in (elsewhere / "r" / "spec.yaml").read_text()  # stored absolute
    ok(utune("eval", str(elsewhere / "r"), cwd=tmp_path))  # from a third folder
    ok(utune("export", str(elsewhere / "r"), "--merge", cwd=tmp_path))


def test_9_model_img_size_builds_a_vit_and_a_swin_at_that_size(tmp_path: Path) -> None:
    for name in ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"):
        (tmp_path / "s.yaml").write_text(f"version: 1\nmodel: {{name: {name}, num_classes: 10, img_size: 112}}\n")
        rep = ok(utune("apply", "s.yaml", "--dry-run", "--format", "json", cwd=tmp_path)).json()
        assert isinstance(rep, dict) and rep["input_size"] == [3, 112, 112] and rep["num_outputs"] == 10


# ---- bad command lines and broken environments: exit 2, one message, no traceback, nothing left ------------


BAD: dict[str, tuple[list[str], dict[str, str]]] = {
    "missing_spec": (["apply", "missing.yaml", "--train"], {}),
    "spec_is_a_folder": (["apply", ".", "--dry-run"], {}),
    "out_is_a_file": (["apply", "spec.yaml", "--train", "--out", "spec.yaml"], {}),
    "resume_nothing": (["apply", "spec.yaml", "--train", "--resume", "--out", "nowhere"], {}),
    "resume_no_runs": (["apply", "spec.yaml", "--train", "--resume"], {}),
    "too_few_classes": (["apply", "spec.yaml", "--train", "model.num_classes=5"], {}),
    "too_many_classes": (["apply", "spec.yaml", "--train", "model.num_classes=100"], {}),
    "missing_dataset": (["apply", "spec.yaml", "--train", "--dataset", "cifar100"], {}),
    "unknown_dataset": (["apply", "spec.yaml", "--train", "data.dataset=cifar1000"], {}),
    "no_download": (["apply", "spec.yaml", "--train", "--dataset", "cub", "--download"], {}),
    "no_dataset": (["apply", "spec.yaml", "--train", "data.dataset=null"], {}),
    "resume_without_train": (["apply", "spec.yaml", "--resume"], {}),
    "out_without_train": (["apply", "spec.yaml", "--out", "x"], {}),
    "unknown_device": (["apply", "spec.yaml", "--train", "train.device=tpu"], {}),
    "bad_override": (["apply", "spec.yaml", "train.lr=fast"], {}),
    "glob_of_a_list_matches_nothing": (["apply", "spec.yaml", "tuners.0.at=[blocks.*.attn.qkv, blocks.*.nope]"], {}),
    "eval_no_runs": (["eval"], {}),
    "eval_not_a_run": (["eval", "."], {}),
    "eval_bad_checkpoint": (["eval", "--checkpoint", "newest"], {}),
    "export_no_runs": (["export", "--merge"], {}),
    "export_two_modes": (["export", "--merge", "--peft"], {}),
    "export_format_peft": (["export", "--format", "peft"], {}),
    "export_spec_no_output": (["export", "spec.yaml", "--merge"], {}),
    "export_under_a_file": (["export", "spec.yaml", "--merge", "-o", "spec.yaml/m.safetensors"], {}),
    "show_spec_missing": (["spec", "show", "nope.safetensors"], {}),
    "show_spec_of_a_spec": (["spec", "show", "spec.yaml"], {}),
    "unknown_model": (["inspect", "vit_bsae_patch16_224"], {}),
    "inspect_format": (["inspect", "test_vit", "--format", "yaml"], {}),
    "tuners_format": (["tuners", "--format", "xml"], {}),
    "unknown_option": (["apply", "spec.yaml", "--frobnicate"], {}),
    "unknown_command": (["frobnicate"], {}),
    "missing_argument": (["apply"], {}),
    "world_size_alone": (["apply", "spec.yaml", "--train"], {"WORLD_SIZE": "2"}),
    "world_size_not_a_number": (["apply", "spec.yaml", "--train"], {"WORLD_SIZE": "two"}),
    "data_env_nowhere": (["apply", "spec.yaml", "--train", "--dataset", "cifar10"], {"UTUNE_DATA": "/nonexistent"}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_command_lines_exit_2_with_one_message(case: str, tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    before = files(tmp_path)
    args, extra = BAD[case]
    r = utune(*args, cwd=tmp_path, env=env_for(tmp_path, **extra))
    assert r.code == 2, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "Traceback" not in r.out + r.err
    assert r.err.lstrip().startswith(("error:", "Usage:")) and ("hint:" in r.err or "Error:" in r.err), r.err
    assert files(tmp_path) == before, f"left behind: {files(tmp_path) - before}"


def test_cuda_requested_without_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "spec.yaml").write_text(SPEC)
    r = utune("apply", "spec.yaml", "--train", "train.device=cuda", cwd=tmp_path)
    assert r.code == 2 and "CUDA is not available" in r.err and not (tmp_path / "runs").exists()


def test_a_full_disk_during_training_leaves_nothing_half_written(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 16 KiB fail (EFBIG), as a full disk does; the checkpoint
    (~60 KiB of optimizer state) cannot be written."""
    import resource

    (tmp_path / "spec.yaml").write_text(SPEC)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "utune"]
    proc = subprocess.run(
        [*cmd, "apply", "spec.yaml", "--train", "--out", "run"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write the checkpoint" in proc.stderr and "free some space" in proc.stderr
    assert not (tmp_path / "run").exists()  # a failed start leaves no run a later default would pick


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never appeared; stderr so far:\n{seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_checkpoints_and_says_how_to_resume(sig: int, tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(
        SPEC.replace("max_steps: 4", "max_steps: 400").replace("epochs: 1", "epochs: 20")
    )
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "utune"]
    proc = subprocess.Popen(
        [*cmd, "apply", "spec.yaml", "--train", "--out", "run"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(proc, "step 4/")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert "interrupted at step" in err and "utune apply spec.yaml --train --out run --resume" in err
    step = int(err.split("interrupted at step ")[1].split()[0])
    assert (tmp_path / "run" / "checkpoints" / "latest.txt").read_text().strip() == f"step-{step:08d}"
    no_temp_files(tmp_path)


def test_a_signal_during_export_removes_the_partial_file(tmp_path: Path) -> None:
    """SIGTERM arrives while the merged file is being written (sent by the write itself, deterministically)."""
    (tmp_path / "spec.yaml").write_text(SPEC)
    run = tmp_path / "run"
    ok(utune("apply", "spec.yaml", "--train", "--out", "run", cwd=tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    driver = (
        "import os, signal, sys\n"
        "import utune._fs as io\n"  # the one atomic writer every export goes through
        "real = io._write_all\n"
        "def write(fd, data):\n"
        "    os.write(fd, bytes(data[:100]))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    real(fd, data)\n"
        "io._write_all = write\n"
        "from utune.cli import main\n"
        f"main(['export', {str(run)!r}, '--merge', '-o', 'm.safetensors'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", driver], cwd=out, env=env_for(out), capture_output=True, text=True)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in proc.stderr, proc.stderr
    assert files(out) == set()  # neither the file nor its temp


def test_help_does_not_import_torch() -> None:
    code = "import sys, utune.cli; assert 'torch' not in sys.modules, 'the CLI module imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_run_and_export_folders_follow_the_umask(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "utune"]
    for args in (["apply", "spec.yaml", "--train", "--out", "run"], ["export", "run", "--peft", "-o", "e/peft"]):
        proc = subprocess.run(
            [*cmd, *args], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
            preexec_fn=lambda: os.umask(0o022),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    folders = [tmp_path / "run", *(tmp_path / "run" / "checkpoints").glob("step-*"), tmp_path / "e" / "peft"]
    assert folders[1:-1] and all(f.stat().st_mode & 0o777 == 0o755 for f in folders), [
        (f, oct(f.stat().st_mode)) for f in folders
    ]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "e" / "peft").iterdir())


def test_export_from_a_spec_without_tuners_warns(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC.replace("img_size: 32}", "img_size: 32, num_classes: 10}"))
    r = ok(utune("export", "spec.yaml", "--merge", "-o", "m.safetensors", cwd=tmp_path))
    assert "without --tuners: its tuners are as initialised, not trained" in r.err


def test_ssf_on_every_batchnorm_of_a_resnet_merges(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "version: 1\nmodel: {name: resnet18, num_classes: 10, img_size: 32}\n"
        "tuners:\n  - {name: ssf, kind: ssf, at: {type: BatchNorm2d}, init_std: 0.1}\ntrainable: [fc]\n"
    )
    doc = ok(utune("export", "s.yaml", "--merge", "-o", "m.safetensors", "--format", "json", cwd=tmp_path)).json()
    assert isinstance(doc, dict) and doc["folds"] == 20 and doc["verify"]["ok"] is True  # downsample BNs too


def test_layers_beyond_the_model_warn_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    at = "tuners.0.at={path: blocks.*.attn.qkv, layers: 2-15}"
    r = ok(utune("apply", "spec.yaml", at, "--dry-run", cwd=tmp_path))
    assert "warning: rule 'lora': layers 6-15 do not exist" in r.err

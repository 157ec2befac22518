"""Two-process DDP training on CPU (gloo) under torchrun, with a frozen backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent

_SCRIPT = """
import json, sys, types
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from test_train_loop import Digits, digits_loaders, tiny_vit, train_cfg
from utune.train import distributed as du
from utune import runs as run_mod
from utune.train.checkpoint import trainable_state
from utune.spec.sections import DataConfig
from utune.train.loop import evaluate
from utune.train.sampling import ShardSampler

tmp = Path({tmp!r})
du.setup("cpu")
rank = du.rank()
assert du.world() == 2 and du.is_main() == (rank == 0)

# Sharded evaluation counts every validation image exactly once (297 is odd: shards differ in size).
val = Digits("val")
shard = DataLoader(val, batch_size=64, sampler=ShardSampler(len(val), rank=rank, world=2))
res = evaluate(tiny_vit(), shard, "cpu")
(tmp / f"eval{{rank}}.json").write_text(json.dumps(res))

class Spec:
    model = types.SimpleNamespace(name="test_vit")
    data = DataConfig(dataset="digits")
    train = train_cfg(max_steps=6, checkpoint_every=3, eval_every=3, log_every=2)

class Built:
    model = tiny_vit()
    spec = Spec
    data_config = {{}}
    report = {{}}
    model_label = "test_vit"  # as utune.engine.record.Built names the model

run_mod.build_loaders = lambda data_cfg, data_config, tcfg, splits=("train", "val"), **kw: digits_loaders()
sys.modules["utune.spec"] = types.SimpleNamespace(spec_to_yaml=lambda s: "version: 1\\n")
# Each rank proposes its own run dir (as timestamped defaults can differ); rank 0's must win.
summary = run_mod.train_run(Built, tmp / f"run-from-rank{{rank}}", resume=False)
weights = {{k: v.contiguous() for k, v in trainable_state(Built.model).items()}}
save_file(weights, str(tmp / f"rank{{rank}}.safetensors"))
(tmp / f"summary{{rank}}.json").write_text(json.dumps(summary))
assert not torch.distributed.is_initialized()  # train_run left the process group
"""


def test_torchrun_two_processes_on_gloo(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(tests=str(TESTS_DIR), tmp=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UTUNE_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = tmp_path / "run-from-rank0"
    assert not (tmp_path / "run-from-rank1").exists()
    assert (run / "spec.yaml").read_text() == "version: 1\n"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # One writer: every (step, split) appears once.
    assert Counter((r["step"], r.get("split")) for r in lines) == Counter(
        [(2, None), (4, None), (6, None), (3, "val"), (6, "val")]
    )
    state = torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert state["world"] == 2 and len(state["ranks"]) == 2

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert set(w0) == set(w1) and w0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    saved = load_file(run / "checkpoints" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(saved[n], w0[n]) for n in w0)

    e0, e1 = (json.loads((tmp_path / f"eval{r}.json").read_text()) for r in (0, 1))
    assert e0 == e1 and e0["n"] == 297
    s0, s1 = (json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0["step"] == s1["step"] == 6 and s0["final_val_acc"] == s1["final_val_acc"]
    assert s0["meta"]["processes"] == 2 and s0["out_dir"] == s1["out_dir"] == str(run)


# ---- the command line under torchrun: FSDP equals one process; a failing rank ends the run ----------------

SPEC = """\
version: 1
model: {name: test_vit, num_classes: 10, img_size: 32}
tuners:
  - {name: lo, kind: lora, at: "blocks.*.attn.qkv", rank: 4}
trainable: [head]
data: {dataset: digits, augment: false, num_workers: 0}
train: {epochs: 1, max_steps: 30, batch_size: 32, log_every: 1, eval_every: 15, device: cpu, seed: 3}
"""


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("UTUNE_QUIET", "WORLD_SIZE", "RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "UTUNE_DATA": str(tmp / "data")}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "split" not in r}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    folder = (run / "checkpoints" / "latest.txt").read_text().strip()
    return load_file(run / "checkpoints" / folder / "model.safetensors")


def test_fsdp_on_two_processes_equals_one_process_and_resumes(tmp_path: Path) -> None:
    import signal

    (tmp_path / "spec.yaml").write_text(SPEC)
    single = [sys.executable, "-m", "utune", "apply", "spec.yaml", "--train", "--out", "single"]
    proc = subprocess.run(single, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = _torchrun("-m", "utune", "apply", "spec.yaml", "--train", "--out", "fsdp", "train.batch_size=16",
                        "train.parallel=fsdp")  # fmt: skip
    run = subprocess.Popen(sharded, cwd=tmp_path, env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    seen = ""
    for line in run.stderr:  # stop it part-way (torchrun passes SIGTERM on): a checkpoint at a step boundary
        seen += line
        if "step 4/30" in line:
            run.send_signal(signal.SIGTERM)
            break
    rest = run.communicate(timeout=300)[1]
    assert run.returncode != 0 and "interrupted at step" in seen + rest, seen + rest
    resumed = [*sharded, "--resume"]
    proc = subprocess.run(resumed, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    assert sorted(one) == sorted(two) == list(range(1, 31))
    assert all(abs(one[s] - two[s]) <= 1e-5 for s in one), [
        (s, one[s], two[s]) for s in one if abs(one[s] - two[s]) > 1e-5
    ]
    w1, w2 = _weights(tmp_path / "single"), _weights(tmp_path / "fsdp")
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_an_exception_on_one_rank_ends_every_rank_promptly(tmp_path: Path) -> None:
    import time

    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "fail.py").write_text(
        textwrap.dedent("""
        import os
        from utune.train import loop
        step = loop.Trainer._optimizer_step
        def failing(self):
            if os.environ["RANK"] == "1" and self.state.step == 3:
                raise RuntimeError("injected failure on rank 1")
            return step(self)
        loop.Trainer._optimizer_step = failing
        from utune.cli import main
        main(["apply", "spec.yaml", "--train", "--out", "run"])
    """)
    )
    start = time.monotonic()
    proc = subprocess.run(_torchrun("fail.py"), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    took = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and took < 90, (took, output[-2000:])
    assert "injected failure on rank 1" in output  # the failing rank's own message
    assert "rank 0 stopped: another process of this run failed or vanished" in output
    assert "MarkupError" not in output

"""Multi-task training on one backbone pass: tasks from different datasets, each task's tuners on its rows.

Numerical: a set's output on its rows of a concatenated batch equals the set run alone on those rows (ViT and
ResNet; bypass, LoRA, adapter sets; the narrowed path and the whole-batch fallback), and one multi-task
step's gradients are each task's own. User path: ``utune multitask`` from an empty folder, piped and
``--format json``, then ``utune eval`` / ``utune export`` on a task's folder; bad input exits 2, no traceback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from tests.test_cli_user import SCRIPT, _wait_for, env_for, ok, utune
from utune.engine.sets import TunerSets, _SharedRun, build_sets


def _spec(model: str, tuners: list[dict[str, Any]], classes: int, img: int = 32) -> dict[str, Any]:
    m = {"name": model, "pretrained": False, "num_classes": classes, "img_size": img}
    return {"version": 1, "model": m, "tuners": tuners, "trainable": ["head" if "vit" in model else "fc"]}


CASES = {
    "test_vit": {
        "bypass": [{"name": "b", "kind": "bypass", "at": "blocks.*", "dim": 4}],
        "lora": [{"name": "l", "kind": "lora", "at": "blocks.*.attn.qkv", "rank": 2}],
        "adapter": [{"name": "a", "kind": "adapter", "at": "blocks.*.mlp", "dim": 4, "placement": "parallel"}],
    },
    "test_resnet": {
        "lora": [{"name": "l", "kind": "lora", "at": "layer*.*.conv2", "rank": 2}],
        "adapter": [{"name": "a", "kind": "adapter", "at": "layer*.*", "dim": 4, "placement": "parallel"}],
    },
}


def _sets(model: str) -> TunerSets:
    img = 32 if "vit" in model else 64
    sets = build_sets({k: _spec(model, t, 3 + i, img) for i, (k, t) in enumerate(CASES[model].items())})
    gen = torch.Generator().manual_seed(0)
    for name in sets.built:
        for p in sets.sets[name].parameters():
            if p.requires_grad:  # away from zero init: every tuner changes its set's output
                p.data = torch.randn(p.shape, generator=gen) * 0.1
    return sets


def _rows(sets: TunerSets) -> dict[str, slice]:
    rows, start = {}, 0
    for i, name in enumerate(sets.built):
        rows[name] = slice(start, start + 2 + i)  # unequal row counts: no size is a coincidence
        start += 2 + i
    return rows


@pytest.mark.parametrize("model", list(CASES))
def test_each_set_on_its_rows_equals_the_set_alone(model: str) -> None:
    sets = _sets(model).eval()
    rows = _rows(sets)
    x = torch.randn(max(r.stop for r in rows.values()), *next(iter(sets.built.values())).input_size)
    with torch.no_grad():
        out = sets.forward_sets(x, rows=rows)
        for name, r in rows.items():
            assert _SharedRun(sets.sets[name], {}, r, sets.batch_dims(name)).out_rows is None  # narrowed, not whole
            sets.set_active(name)
            alone = sets(x[r])
            assert out[name].shape == alone.shape
            torch.testing.assert_close(out[name], alone, atol=1e-5, rtol=1e-5)
            whole = _SharedRun(sets.sets[name], {}, r, None)  # no batch dims known: whole batch, rows of output
            assert whole.out_rows == r
            torch.testing.assert_close(whole.run(x), alone, atol=1e-5, rtol=1e-5)


def _interpreted(sets: TunerSets, x: torch.Tensor, rows: dict[str, slice] | None) -> dict[str, torch.Tensor]:
    """forward_sets as it was: an fx.Interpreter per set, node by node, sharing a value cache."""
    cache: dict[str, Any] = {}
    if rows is None:
        return {n: _SharedRun(sets.sets[n], cache).run(x) for n in sets.built}
    return {n: _SharedRun(sets.sets[n], cache, r, sets.batch_dims(n)).run(x) for n, r in rows.items()}


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("with_rows", [False, True], ids=["shared-images", "rows"])
def test_generated_forward_sets_equals_the_interpreter_bit_for_bit(model: str, with_rows: bool) -> None:
    sets = _sets(model)
    rows = _rows(sets) if with_rows else None
    n = max(r.stop for r in rows.values()) if rows else 3
    x = torch.randn(n, *next(iter(sets.built.values())).input_size)
    for mode in ("eval", "train"):  # train: gradients through the generated code equal the interpreter's too
        getattr(sets, mode)()
        params = [p for p in sets.parameters() if p.requires_grad]
        got = sets.forward_sets(x, rows=rows)
        sum(o.sum() for o in got.values()).backward()  # type: ignore[union-attr]
        grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        sets.zero_grad(set_to_none=True)
        want = _interpreted(sets, x, rows)
        sum(o.sum() for o in want.values()).backward()  # type: ignore[union-attr]
        for name in want:
            assert torch.equal(got[name], want[name]), (mode, name)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, params, strict=True)), mode
        sets.zero_grad(set_to_none=True)


def test_one_generated_set_is_the_sets_own_graph() -> None:
    """One set through forward_sets runs exactly the ops of its own forward: nothing added, no interpreter."""
    sets = _sets("test_vit").eval()
    for name in sets.built:
        gm = sets._compiled([name], with_rows=False)
        own = [n for n in sets.sets[name].graph.nodes if n.op not in ("placeholder", "output")]
        ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        assert [str(n.target) for n in own] == [str(n.target).removeprefix("s0.") for n in ops]
        assert "Interpreter" not in gm.code and "run_node" not in gm.code


def test_a_multi_task_step_gives_each_task_its_own_gradients() -> None:
    sets = _sets("test_vit").train()
    rows = _rows(sets)
    n = max(r.stop for r in rows.values())
    x = torch.randn(n, *next(iter(sets.built.values())).input_size)
    y = {name: torch.randint(0, 3 + i, (r.stop - r.start,)) for i, (name, r) in enumerate(rows.items())}
    params = {name: [p for p in sets.sets[name].parameters() if p.requires_grad] for name in sets.built}
    sum(sets.losses(x, y, rows=rows).values()).backward()  # type: ignore[union-attr]
    together = {name: [p.grad.clone() for p in ps] for name, ps in params.items()}  # type: ignore[union-attr]
    for name, r in rows.items():
        sets.zero_grad(set_to_none=True)
        sets.set_active(name)
        nn.functional.cross_entropy(sets(x[r]), y[name]).backward()
        for g, p in zip(together[name], params[name], strict=True):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_build_sets_gives_each_set_its_datasets_class_count() -> None:
    base = {"version": 1, "model": {"name": "test_vit", "pretrained": False, "img_size": 32}, "trainable": ["head"]}
    tuners = CASES["test_vit"]["bypass"]
    digits = {**base, "tuners": tuners, "data": {"dataset": "digits"}}
    rotation = {**base, "tuners": tuners, "data": {"dataset": "digits", "task": "rotation"}}
    sets = build_sets({"digits": digits, "rotation": rotation})  # num_classes left out: 10 and 4
    assert sets.sets["digits"].get_submodule("head").out_features == 10
    assert sets.sets["rotation"].get_submodule("head").out_features == 4


def test_task_arguments_name_tasks_and_override_all_or_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utune.cli.multitask import parse_tasks

    monkeypatch.chdir(_folder(tmp_path))
    tasks, overrides = parse_tasks(["digits.yaml", "turned=rotation.yaml", "train.lr=0.1", "turned:train.seed=3"])
    assert tasks == {"digits": Path("digits.yaml"), "turned": Path("rotation.yaml")}
    assert overrides == {"digits": ["train.lr=0.1"], "turned": ["train.lr=0.1", "train.seed=3"]}


# ---- the command ----------------------------------------------------------------------------------------

TASK = """\
version: 1
model: {{name: test_vit, pretrained: {weights}, img_size: 32}}
tuners: [{{name: side, kind: bypass, at: "blocks.*", dim: 4}}]
trainable: [head]
data: {{dataset: digits, {task}num_workers: 0, augment: none}}
train: {{epochs: 1, batch_size: {batch}, lr: 1.0e-2, log_every: 3}}
"""


def _folder(tmp: Path, weights: str = "backbone.safetensors") -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "backbone.safetensors"))
    (tmp / "digits.yaml").write_text(TASK.format(weights=weights, task="", batch=16))
    (tmp / "rotation.yaml").write_text(TASK.format(weights=weights, task="task: rotation, ", batch=8))
    return tmp


def test_multitask_command_trains_tasks_whose_folders_are_runs(tmp_path: Path) -> None:
    cwd = _folder(tmp_path)
    r = ok(
        utune("multitask", "digits.yaml", "turned=rotation.yaml", "--steps", "6", "--out", "mt", "-f", "json", cwd=cwd)
    )
    doc = r.json()
    assert isinstance(doc, dict) and doc["steps"] == 6 and set(doc["tasks"]) == {"digits", "turned"}
    assert doc["tasks"]["digits"]["rows"] == 16 and doc["tasks"]["turned"]["rows"] == 8
    assert "step 6/6: loss digits" in r.err  # progress on stderr, the JSON alone on stdout
    saved = json.loads((cwd / "mt" / "multitask.json").read_text())
    assert saved["tasks"]["turned"]["test_acc"] == doc["tasks"]["turned"]["test_acc"]
    scored = ok(utune("eval", "mt/turned", "--format", "json", cwd=cwd)).json()
    assert isinstance(scored, dict) and scored["n"] == 360
    assert scored["acc"] == pytest.approx(doc["tasks"]["turned"]["test_acc"], abs=1e-9)  # the folder is that model
    ok(utune("export", "mt/digits", "--tuners-only", cwd=cwd))
    assert (cwd / "mt" / "digits" / "export" / "tuners.safetensors").is_file()
    table = ok(utune("multitask", "digits.yaml", "rotation.yaml", "--steps", "3", cwd=cwd))  # default --out
    assert "rotation" in table.out and len(list((cwd / "runs").glob("multitask-*/multitask.json"))) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("random", "randomly initialised"),  # digits 10 classes, rotation 4: timm's init differs
        ("bn_train", "train.bn_train"),
        ("again", "already holds a multi-task run"),
        ("missing", "spec file not found: nope.yaml"),
        ("unknown_task", "no task named 'nope'"),
    ],
)
def test_multitask_refuses_what_it_cannot_do_in_one_line(tmp_path: Path, change: str, message: str) -> None:
    cwd = _folder(tmp_path, weights="false" if change == "random" else "backbone.safetensors")
    args = ["multitask", "digits.yaml", "rotation.yaml", "--steps", "2", "--out", "mt"]
    if change == "bn_train":
        args.append("train.bn_train=true")
    if change == "missing":
        args[2] = "nope.yaml"
    if change == "unknown_task":
        args.append("nope:train.lr=0.1")
    if change == "again":
        ok(utune(*args, cwd=cwd))
    r = utune(*args, cwd=cwd, env=env_for(cwd))
    assert r.code == 2 and message in r.err and "Traceback" not in r.err, r.err


def test_ctrl_c_stops_a_multi_task_run_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    cwd = _folder(tmp_path)
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "utune"]
    args = [*cmd, "multitask", "digits.yaml", "rotation.yaml", "--steps", "3000", "--out", "mt"]
    proc = subprocess.Popen(
        args, cwd=cwd, env=env_for(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(proc, "step 3/3000")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert "interrupted" in err and not (cwd / "mt").exists()

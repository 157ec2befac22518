"""The CLI: bad input exits 2 with one message and no traceback; inspect and apply print what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utune.cli import main

TINY = "model:\n  name: test_vit\n  num_classes: 10\n"
RULE = "version: 1\n" + TINY + "tuners:\n  - "  # a spec up to its first rule


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    code = e.value.code if isinstance(e.value.code, int) else (0 if e.value.code is None else 1)
    return code, captured.out, captured.err


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BAD_SPECS = {
    "yaml_syntax": "version: 1\nmodel: {name: test_vit\n",
    "empty": "",
    "not_mapping": "- a\n- b\n",
    "scalar": "just text\n",
    "bad_version": "version: 2\n" + TINY,
    "no_version": TINY,
    "unknown_top_key": "version: 1\n" + TINY + "tuner: []\n",
    "unknown_kind": RULE + "{name: a, kind: lorra, at: blocks.*.attn.qkv}\n",
    "wrong_type": RULE + "{name: a, kind: adapter, at: blocks.*.mlp, dim: ten}\n",
    "unknown_rule_key": RULE + "{name: a, kind: lora, at: blocks.*.attn.qkv, rnak: 4}\n",
    "bad_placement": "version: 1\n"
    + TINY
    + "tuners:\n  - {name: a, kind: lora, at: blocks.*.attn.qkv, placement: sequential}\n",
    "dup_names": RULE + "{name: a, kind: lora, at: blocks.*.attn.qkv}\n  - {name: a, kind: ssf, at: blocks.*.norm1}\n",
    "no_match": RULE + "{name: a, kind: lora, at: blocks.*.atn.qkv}\n",
    "unknown_model": "version: 1\nmodel: {name: vit_bsae_patch16_224}\n",
    "prefix_on_conv": "version: 1\nmodel: {name: test_resnet}\n"
    "tuners:\n  - {name: p, kind: prefix, at: layer1.0.conv1}\n",
    "slices_not_qkv": "version: 1\n"
    + TINY
    + "tuners:\n  - {name: a, kind: lora, at: blocks.*.mlp.fc1, slices: [q, v]}\n",
    "lora_on_norm": RULE + "{name: a, kind: lora, at: blocks.*.norm1}\n",
    "trainable_nothing": "version: 1\n" + TINY + "trainable: [haed]\n",
    "bad_layers": "version: 1\n"
    + TINY
    + "tuners:\n  - {name: a, kind: lora, at: {path: blocks.*.attn.qkv, layers: 5-2}}\n",
    "weights_missing": "version: 1\nmodel: {name: test_vit, pretrained: /nonexistent/w.safetensors}\n",
}


# what each message must name: the problem, and where (the spec's line) or what to do (a hint)
NAMED = {
    "bad_layers": ("spec.yaml:6", "range 5-2 is empty"),
    "bad_placement": ("spec.yaml:6", "has no placement 'sequential'"),
    "bad_version": ("spec.yaml:1", "unsupported spec version 2"),
    "dup_names": ("spec.yaml:7", "duplicate rule name 'a'"),
    "empty": ("spec.yaml:1", "the spec is empty"),
    "lora_on_norm": ("hint:", "it is a LayerNorm"),
    "no_match": ("hint: closest sites: blocks.", "matches no site"),
    "no_version": ("spec.yaml:1", "version: missing"),
    "not_mapping": ("spec.yaml:1", "got a list"),
    "prefix_on_conv": ("hint:", "prefix cannot attach to layer1.0.conv1"),
    "scalar": ("spec.yaml:1", "got a str"),
    "slices_not_qkv": ("hint:", "`slices` need a fused qkv Linear"),
    "trainable_nothing": ("hint: closest: head.", "trainable glob 'haed' matches no parameter"),
    "unknown_kind": ("spec.yaml:6", "did you mean lora"),
    "unknown_model": ("spec.yaml:2", "did you mean vit_base_patch16_224"),
    "unknown_rule_key": ("spec.yaml:6", "did you mean 'rank'"),
    "unknown_top_key": ("spec.yaml:5", "did you mean 'tuners'"),
    "weights_missing": ("hint:", "'/nonexistent/w.safetensors' does not exist"),
    "wrong_type": ("spec.yaml:6", "tuners.0.dim"),
    "yaml_syntax": ("spec.yaml:3", "YAML syntax error"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_with_one_message(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["apply", write(tmp_path, BAD_SPECS[case]), "--dry-run"], capsys)
    assert code == 2, (code, err)
    assert err.startswith("error:") and "Traceback" not in err + out
    where, what = NAMED[case]
    assert where in err and what in err, (case, err)
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1, err  # one message


@pytest.mark.parametrize(
    "argv",
    [
        ["apply", "/nonexistent/spec.yaml", "--dry-run"],
        ["apply", "{spec}", "tuners.0.dim=16", "--dry-run"],  # no tuners: index out of range
        ["apply", "{spec}", "model.nmae=x", "--dry-run"],
        ["apply", "{spec}", "noequals", "--dry-run"],
        ["apply", "{spec}", "train.lr=fast", "--dry-run"],
        ["apply", "{spec}", "--format", "xml"],
        ["apply", "{spec}", "--resume"],
        ["inspect", "not_a_model_name"],
        ["inspect", "test_vit", "--format", "yaml"],
        ["inspect", "torchvision:resnet1"],
        ["spec", "validate", "/nonexistent.yaml"],
        ["apply"],
        ["inspect", "test_vit", "--depth", "-1"],
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, "version: 1\n" + TINY)
    code, out, err = run([a.replace("{spec}", spec) for a in argv], capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err and err.strip()


def test_error_lines_name_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["spec", "validate", write(tmp_path, BAD_SPECS["wrong_type"])], capsys)
    assert code == 2 and "spec.yaml:6" in err and "tuners.0.dim" in err


def test_inspect_json_has_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", "test_vit", "--format", "json"], capsys)
    rows = json.loads(out)
    assert code == 0 and {"path", "op", "type", "shape", "params"} <= set(rows[0])
    qkv = [r for r in rows if r["path"].endswith("attn.qkv")]
    assert len(qkv) == 6 and qkv[0]["type"] == "Linear" and qkv[0]["params"] > 0


def test_inspect_with_spec_shows_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, RULE + "{name: lo, kind: lora, at: blocks.*.attn.qkv}\n")
    code, out, _ = run(["inspect", spec, "--spec", spec, "--format", "json", "--grep", "blocks.0.**"], capsys)
    rows = {r["path"]: r for r in json.loads(out)}
    assert code == 0 and rows["blocks.0.attn.qkv"]["rules"] == ["lo"] and rows["blocks.0.attn.proj"]["rules"] == []


def test_inspect_tree_and_depth(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", "test_resnet", "--format", "tree", "--depth", "2"], capsys)
    assert code == 0 and "layer1" in out and "layer1.0.conv1" not in out


def test_apply_dry_run_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(
        tmp_path,
        RULE + "{name: lo, kind: lora, at: blocks.*.attn.qkv, rank: 4}\ntrainable: [head]\n",
    )
    code, out, _ = run(["apply", spec, "--dry-run", "--verify", "--format", "json", "tuners.0.rank=2"], capsys)
    report = json.loads(out)
    assert code == 0
    assert {"model", "total_params", "trainable_params", "trainable_pct", "tuners", "identity_max_abs_diff"} <= set(
        report
    )
    lora = report["tuners"][0]
    assert lora["name"] == "lo" and len(lora["sites"]) == 6 and lora["params"] == 6 * 2 * (64 + 192)
    assert report["trainable_params"] == lora["params"] + 64 * 10 + 10
    assert report["identity_max_abs_diff"] == 0.0


def test_apply_table_prints_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, "version: 1\n" + TINY + "trainable: [head]\n")
    code, out, _ = run(["apply", spec, "--dry-run"], capsys)
    assert code == 0 and "trainable params: 650 || all params:" in out


def test_tuners_lists_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["tuners", "--format", "json"], capsys)
    kinds = {k["kind"]: k for k in json.loads(out)}
    assert {"adapter", "lora", "prefix", "prompt", "bias", "ssf", "ia3"} <= set(kinds)
    assert kinds["adapter"]["options"]["dim"]["default"] == 10 and kinds["lora"]["mergeable"] is True
    assert (
        kinds["ia3"]["options"]["slices"]["default"] is None
        and kinds["adapter"]["options"]["scale"]["default"] == "channel"
    )
    assert all(o["description"] for k in kinds.values() for o in k["options"].values())  # every option has a meaning
    assert kinds["lora"]["options"]["rank"]["schema"]["type"] == "integer"


def test_spec_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["spec", "schema"], capsys)
    schema = json.loads(out)
    assert code == 0 and "tuners" in json.dumps(schema)


def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    bad = write(tmp_path, "version: 1\nmodel: {name: test_vit}\nbogus: 1\n")
    for cmd in (["-m", "utune"],):
        proc = subprocess.run([sys.executable, *cmd, "apply", bad, "--dry-run"], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "bogus" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "utune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "inspect" in proc.stdout


def test_messages_are_text_not_markup(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A library's message with brackets (gloo's ``[.../pair.cc:561]``) or a hint like utune[peft] prints as it is."""
    from utune import _output as out

    monkeypatch.delenv("UTUNE_QUIET", raising=False)
    monkeypatch.setattr(out, "_json_mode", False)  # an earlier in-process --format json command may have set it
    out.error("peer closed [/__w/gloo/pair.cc:561] connection", "pip install 'utune[peft]'")
    out.warn("a [bold]warning[/bold]")
    out.info("wrote [x] to [/tmp]")
    captured = capsys.readouterr()
    assert "[/__w/gloo/pair.cc:561]" in captured.err and "utune[peft]" in captured.err
    assert "[bold]warning[/bold]" in captured.err and "wrote [x] to [/tmp]" in captured.out

"""Spec loading: every malformed spec names the key path and the line; valid specs load and round-trip."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from utune._schema import Section
from utune.errors import OverrideError, SpecError
from utune.graph.select import Selector
from utune.spec import (
    Spec,
    TunerRule,
    load_spec,
    load_spec_text,
    spec_hash,
    spec_json_schema,
    spec_to_dict,
    spec_to_yaml,
    validate_files,
)
from utune.tuners import registry


class FakeKind:
    kind = "fake"

    class Options(Section):
        dim: int = 10
        scale: float | str = "channel"


class OtherKind:
    kind = "other"

    class Options(Section):
        rank: int = 4
        alpha: float = 1.0


@pytest.fixture(autouse=True)
def fake_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register two small kinds in a private copy of the registry, restored after each test."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))
    registry.register(FakeKind)
    registry.register(OtherKind)


GOOD = """\
version: 1
model:
  name: vit_tiny_patch16_224
  num_classes: 10
tuners:
  - name: ffn
    kind: fake
    at: "blocks.*.mlp"
    dim: 8
  - {name: attn, kind: other, at: {path: "blocks.*.attn", layers: "0-2"}, rank: 2}
trainable: [head, "**.bias"]
train:
  epochs: 2
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> SpecError:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value


def problem(err: SpecError, needle: str) -> str:
    """The one problem line containing ``needle`` (fails listing them all otherwise)."""
    hits = [p for p in err.problems if needle in p.partition(".yaml:")[2 if ".yaml:" in p else 0]]
    assert len(hits) == 1, f"{needle!r} not in exactly one of {err.problems}"
    return hits[0]


# --- malformed specs -----------------------------------------------------------------------------


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nmodel:\n  name: vit: base\n")
    assert type(err) is SpecError
    assert f"{tmp_path / 'spec.yaml'}:3:12: YAML syntax error: mapping values are not allowed here" in err.problems
    assert "not valid YAML" in err.message


def test_two_documents_are_a_syntax_error(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\n---\nversion: 1\n")
    assert ":2:1: YAML syntax error:" in problem(err, "single document")


def test_wrong_type_in_kind_options(tmp_path: Path) -> None:
    text = GOOD.replace("dim: 8", 'dim: "ten"')
    err = error_of(tmp_path, text)
    assert type(err) is SpecError
    assert problem(err, "tuners.0.dim").endswith(
        ':9: tuners.0.dim: input should be a valid integer, unable to parse string as an integer (got "ten")'
    )
    assert "(1 problem)" in err.message


def test_wrong_type_in_section(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("epochs: 2", "epochs: many"))
    assert ":13: train.epochs: input should be a valid integer" in problem(err, "train.epochs")


def test_unknown_top_level_key_did_you_mean(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("tuners:", "tuner:"))
    assert problem(err, "tuner:").endswith(":5: tuner: unknown key 'tuner' (did you mean 'tuners'?)")


def test_unknown_rule_key_did_you_mean(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("dim: 8", "dimm: 8"))
    assert problem(err, "dimm").endswith(":9: tuners.0.dimm: unknown key 'dimm' (did you mean 'dim'?)")


def test_unknown_key_without_close_match_lists_allowed(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("num_classes: 10", "zzz: 10"))
    assert ":4: model.zzz: unknown key 'zzz' (allowed: name, pretrained," in problem(err, "zzz")


def test_unknown_selector_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace('{path: "blocks.*.attn"', '{pth: "blocks.*.attn"'))
    assert problem(err, "pth").endswith(":10: tuners.1.at.pth: unknown key 'pth' (did you mean 'path'?)")


def test_unknown_kind_with_close_name(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("kind: fake", "kind: fak"))
    assert ":7: tuners.0.kind: unknown tuner kind 'fak'; did you mean fake?" in problem(err, "fak")


def test_bad_version(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("version: 1", "version: 2"))
    assert problem(err, "version").endswith(":1: version: unsupported spec version 2; this utune reads version 1")


def test_version_must_be_the_integer_one(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("version: 1", 'version: "1"'))
    assert ":1: version: unsupported spec version '1'" in problem(err, "version")


def test_missing_version_points_at_first_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, "# my spec\n" + GOOD.replace("version: 1\n", ""))
    assert problem(err, "version").endswith(":2: version: missing; a spec starts with `version: 1`")


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = error_of(tmp_path, text)
    assert type(err) is SpecError and "is empty" in err.message
    assert ":1: (top level): the spec is empty" in err.problems[0]


@pytest.mark.parametrize(("text", "got"), [("\n- version: 1\n", "got a list"), ("just words\n", "got a str")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    err = error_of(tmp_path, text)
    assert type(err) is SpecError
    line = 2 if text.startswith("\n") else 1
    assert f":{line}: (top level): expected a mapping" in err.problems[0] and got in err.problems[0]


def test_duplicate_rule_names(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("name: attn", "name: ffn"))
    msg = problem(err, "duplicate rule name")
    assert msg.endswith(":10: tuners.1.name: duplicate rule name 'ffn' (also used by tuners.0); names must be unique")


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("  epochs: 2", "  epochs: 2\n  lr: 0.1\n  epochs: 3"))
    assert problem(err, "duplicate key").endswith(
        ":15: train.epochs: duplicate key 'epochs' (first written on line 13)"
    )


def test_bad_layer_range(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace('layers: "0-2"', 'layers: "5-2"'))
    assert ":10: tuners.1.at.layers: layers '5-2': range 5-2 is empty" in problem(err, "layers")


def test_bad_layer_syntax(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace('layers: "0-2"', 'layers: "first"'))
    assert ":10: tuners.1.at.layers: layers 'first': expected ranges like '0-5'" in problem(err, "layers")


def test_model_name_may_be_left_out_for_a_model_given_in_python(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD.replace("  name: vit_tiny_patch16_224\n", "")))
    assert spec.model.name is None and spec.model.num_classes == 10  # utune.build(spec, model=net)


def test_missing_rule_keys(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace('    at: "blocks.*.mlp"\n', ""))
    assert problem(err, "tuners.0.at").endswith(":6: tuners.0.at: required key is missing")


def test_rule_not_a_mapping(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("  - {name: attn", "  - oops\n  - {name: attn"))
    assert ":10: tuners.1: input should be a valid dictionary" in problem(err, "tuners.1")


def test_bad_rule_name_placement_and_at(tmp_path: Path) -> None:
    text = GOOD.replace("name: ffn", "name: 1ffn").replace('at: "blocks.*.mlp"', "at: 5\n    placement: paralel")
    err = error_of(tmp_path, text)
    assert ":6: tuners.0.name: bad rule name '1ffn'" in problem(err, "tuners.0.name")
    assert ":8: tuners.0.at: input should be a valid dictionary or instance of Selector (got 5)" in problem(
        err, "tuners.0.at"
    )
    assert ":9: tuners.0.placement: input should be 'parallel', 'sequential' or 'concat'" in problem(err, "placement")


def test_union_errors_merge_into_one_problem(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("num_classes: 10", "pretrained: [1]"))
    msg = problem(err, "model.pretrained")
    assert ":4: model.pretrained: input should be a valid boolean" in msg and "valid string" in msg


def test_several_errors_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = (
        GOOD.replace("num_classes: 10", "num_classes: -1")
        .replace("dim: 8", "dimm: 8")
        .replace("kind: other", "kind: othr")
        .replace("epochs: 2", "epochs: two")
        + "exprt: {}\n"
    )
    err = error_of(tmp_path, text)
    assert "(5 problems)" in err.message
    lines = [int(p.split(":")[1]) for p in err.problems]
    assert lines == [4, 9, 10, 13, 14]
    assert "did you mean 'export'" in err.problems[-1]
    assert err.hint and "utune spec schema" in err.hint
    assert "  - " in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in info.value.message and info.value.exit_code == 2


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a folder, not a spec file"):
        load_spec(tmp_path)


# --- overrides -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr", "expected key.path=value"),
        ("=3", "expected key.path=value"),
        ("train..lr=3", "empty segment"),
        ("tuners.5.dim=3", "index 5 is out of range (tuners has 2 items)"),
        ("tuners.x.dim=3", "tuners is a list: index it with a number"),
        ("model.name.x=3", "cannot index into model.name: it is a str"),
        ("trainable=[head", "value is not valid YAML"),
        ("tuners.0.at=**.bias", "quote a value starting with '*'"),
    ],
)
def test_malformed_override(tmp_path: Path, override: str, message: str) -> None:
    err = error_of(tmp_path, GOOD, (override,))
    assert type(err) is OverrideError
    assert problem(err, message).startswith(f"override {override!r}: ")


def test_override_unknown_key_names_the_override(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD, ("tuners.0.dimm=16",))
    assert type(err) is OverrideError
    assert err.problems == ["override 'tuners.0.dimm=16': unknown key 'dimm' (did you mean 'dim'?)"]


def test_override_bad_value_type(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD, ("train.lr=abc", "tuners.1.at.layers=9-1"))
    assert type(err) is OverrideError
    assert problem(err, "train.lr").startswith("override 'train.lr=abc': input should be a valid number")
    assert "override 'tuners.1.at.layers=9-1': layers '9-1': range 9-1 is empty" in problem(err, "9-1")


def test_override_creating_unknown_section(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD, ("model.foo.bar=1",))
    assert problem(err, "foo") == (
        "override 'model.foo.bar=1': model.foo: unknown key 'foo' "
        "(allowed: name, pretrained, num_classes, img_size, class_names, input_size, kwargs, frozen_dtype)"
    )


def test_file_and_override_errors_together(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("epochs: 2", "epochs: x"), ("train.lrr=1",))
    assert type(err) is OverrideError and "(2 problems)" in err.message
    assert ":13: train.epochs:" in err.problems[0] and err.problems[1].startswith("override 'train.lrr=1'")


def test_overrides_apply(tmp_path: Path) -> None:
    text = GOOD.replace("train:\n  epochs: 2\n", "data:\n")  # no train section, an empty data section
    overrides = (
        "model.name=convnext_tiny",
        "tuners.0.dim=16",
        "tuners.1.at.layers=3",
        "train.lr=1e-2",
        "data.dataset=cifar100",
        'trainable=[head, "**.norm*"]',
        "model.kwargs.drop_path_rate=0.1",
        "export.merge=true",
    )
    spec = load_spec(write(tmp_path, text), overrides)
    assert spec.model.name == "convnext_tiny" and spec.model.kwargs == {"drop_path_rate": 0.1}
    assert spec.tuners[0].options.dim == 16  # type: ignore[attr-defined]
    assert spec.tuners[1].at.layers == [3]
    assert spec.train.lr == pytest.approx(0.01) and spec.train.epochs == 10
    assert spec.data.dataset == "cifar100" and spec.export.merge is True
    assert spec.trainable == ["head", "**.norm*"]
    assert spec.overrides == overrides


def test_overrides_do_not_touch_the_callers_dict() -> None:
    data = {"version": 1, "model": {"name": "test_vit"}}
    spec = load_spec(data, ["model.name=test_vit2", "train.epochs=1"])
    assert data == {"version": 1, "model": {"name": "test_vit"}}
    assert spec.model.name == "test_vit2" and spec.source == "<dict>"


def test_load_a_loaded_spec_applies_overrides_again(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    first = load_spec(path, ["train.lr=0.5"])
    second = load_spec(first, ["tuners.0.dim=4"])
    assert second.tuners[0].options.dim == 4 and second.train.lr == 0.5  # type: ignore[attr-defined]
    assert second.overrides == ("train.lr=0.5", "tuners.0.dim=4")
    assert second.source_text == path.read_text() and second.source_path == path
    with pytest.raises(OverrideError, match="tuners.0.dimm=4"):
        load_spec(first, ["tuners.0.dimm=4"])


# --- valid specs ---------------------------------------------------------------------------------


def test_valid_spec_loads(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    spec = load_spec(str(path))
    assert spec.version == 1 and spec.model.num_classes == 10 and spec.model.pretrained is False
    ffn, attn = spec.tuners
    assert isinstance(ffn.options, FakeKind.Options) and ffn.options.dim == 8 and ffn.options.scale == "channel"
    assert isinstance(attn.options, OtherKind.Options) and attn.options.rank == 2
    assert attn.at == Selector(path=["blocks.*.attn"], layers=[0, 1, 2])
    assert spec.trainable == ["head", "**.bias"]
    assert spec.train.epochs == 2 and spec.export.format == "safetensors"
    assert spec.source_text == path.read_text() and spec.source == str(path)


def test_empty_sections_take_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "version: 1\nmodel: {name: test_vit}\ntuners:\ntrain:\n# all commented\n"))
    assert spec.tuners == [] and spec.train.epochs == 10


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        ('"blocks.*.mlp"', Selector(path=["blocks.*.mlp"])),
        ('["blocks.0.mlp", "blocks.1.*"]', Selector(path=["blocks.0.mlp", "blocks.1.*"])),
        ("{type: Linear}", Selector(path=["**"], type=["Linear"])),
        (
            '{path: "**.attn", op: scaled_dot_product_attention, layers: "0,2,4-5", exclude: "blocks.0.**"}',
            Selector(path=["**.attn"], op=["scaled_dot_product_attention"], layers=[0, 2, 4, 5]),
        ),
        ("{layers: 3}", Selector(layers=[3])),
        ("{layers: [7, 1, 2, 1]}", Selector(layers=[1, 2, 7])),
    ],
)
def test_at_forms_normalise(tmp_path: Path, at: str, expected: Selector) -> None:
    spec = load_spec(
        write(tmp_path, f"version: 1\nmodel: {{name: test_vit}}\ntuners:\n  - {{name: a, kind: fake, at: {at}}}\n")
    )
    got = spec.tuners[0].at
    assert got.path == expected.path and got.type == expected.type and got.layers == expected.layers
    assert got.op == expected.op
    if "exclude" in at:
        assert got.exclude == ["blocks.0.**"]


def test_spec_to_yaml_round_trips(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD), ["train.lr=0.003", "model.pretrained=weights/vit.safetensors"])
    dumped = spec_to_yaml(spec)
    assert "dim: 8" in dumped and "options" not in dumped  # options written flat, as in the file
    again = load_spec(write(tmp_path, dumped, "resolved.yaml"))
    assert again == spec and spec_hash(again) == spec_hash(spec)
    assert spec_to_dict(again) == spec_to_dict(spec)
    assert load_spec_text(dumped, "<embedded>") == spec


def test_spec_hash_tracks_settings() -> None:
    base = {"version": 1, "model": {"name": "test_vit"}}
    h = spec_hash(load_spec(base))
    assert len(h) == 64 and h == spec_hash(load_spec(base))
    assert h != spec_hash(load_spec(base, ["train.lr=0.5"]))


def test_a_key_added_later_keeps_older_runs_hashes_at_its_default() -> None:
    """``utune compare`` names runs by hash: train.release_freed_memory (added later, no effect on the
    weights) must not rename every finished run."""
    import hashlib

    from utune.spec import spec_to_dict

    spec = load_spec({"version": 1, "model": {"name": "test_vit"}})
    before = spec_to_dict(spec)
    del before["train"]["release_freed_memory"]  # the resolved spec as an older utune wrote it
    for section, key in (("data", "test_size"), ("data", "skip_bad_images"), ("model", "class_names")):
        del before[section][key]  # added later still: none of them renames a finished run
    del before["model"]["input_size"]  # added later too
    older = json.dumps(before, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec_hash(spec) == hashlib.sha256(older.encode("utf-8")).hexdigest()
    assert spec_hash(load_spec(spec, ["train.release_freed_memory=true"])) != spec_hash(spec)


def test_json_schema_lists_every_kind(tmp_path: Path) -> None:
    schema = json.loads(json.dumps(spec_json_schema()))
    assert set(schema["properties"]) == {"version", "model", "tuners", "trainable", "data", "train", "export"}
    rule = schema["$defs"]["TunerRule"]
    variants = {v["properties"]["kind"]["const"]: v for v in rule["oneOf"] if "const" in v["properties"]["kind"]}
    [yours] = [v for v in rule["oneOf"] if "const" not in v["properties"]["kind"]]  # kind: package.module:Class
    assert re.match(yours["properties"]["kind"]["pattern"], "my_pkg.kinds:GatedAdapter")
    assert {"fake", "other"} <= set(variants)
    assert {"dim", "scale", "name", "at"} <= set(variants["fake"]["properties"])
    assert {"rank", "alpha"} <= set(variants["other"]["properties"]) and "dim" not in variants["other"]["properties"]
    assert all(v["additionalProperties"] is False for v in variants.values())
    assert "options" not in variants["fake"]["properties"]
    assert schema["$defs"]["Selector"]["additionalProperties"] is False
    assert "string" in json.dumps(schema["$defs"]["Selector"]["properties"]["layers"])
    assert schema["additionalProperties"] is False


def test_validate_files(tmp_path: Path) -> None:
    good, bad = write(tmp_path, GOOD, "good.yaml"), write(tmp_path, "version: 2\n", "bad.yaml")
    results = validate_files([good, str(bad), tmp_path / "missing.yaml"])
    assert [p.name for p, _ in results] == ["good.yaml", "bad.yaml", "missing.yaml"]
    assert results[0][1] is None
    assert isinstance(results[1][1], SpecError) and isinstance(results[2][1], SpecError)


def test_rules_built_in_code() -> None:
    rule = TunerRule(name="a", kind="fake", at="blocks.*")
    assert isinstance(rule.options, FakeKind.Options) and rule.options.dim == 10
    with pytest.raises(ValidationError, match="must be FakeKind.Options, not OtherKind.Options"):
        TunerRule(name="a", kind="fake", at="x", options=OtherKind.Options())
    with pytest.raises(ValidationError, match="duplicate rule name"):
        Spec(version=1, model={"name": "test_vit"}, tuners=[rule, rule])


def test_layout_on_a_rule_is_its_channel_dim_in_words(tmp_path: Path) -> None:
    """``layout: channels_first`` sets the kind's ``channel_dim: 1`` (``channels_last``/``nhwc``/``tokens``: -1); a
    kind without a layout, an unknown value or a contradicting channel_dim is an error at the line."""
    import yaml

    from utune.spec import spec_json_schema

    def rule(**extra: Any) -> Path:
        body = {"version": 1, "model": {"name": "test_resnet", "pretrained": False}, "trainable": ["fc"],
                "tuners": [{"name": "a", "kind": "adapter", "at": "layer1.*", **extra}]}  # fmt: skip
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    assert load_spec(rule(layout="channels_first")).tuners[0].options.channel_dim == 1
    assert load_spec(rule(layout="nhwc")).tuners[0].options.channel_dim == -1
    for extra, message in [
        ({"layout": "sideways"}, "layout 'sideways' is not one of"),
        ({"layout": "nhwc", "channel_dim": 1}, "says channel_dim -1, the rule says 1"),
        ({"layout": "nchw", "kind": "lora", "at": "layer1.0.conv1"}, "kind 'lora' reads no channel layout"),
    ]:
        with pytest.raises(SpecError, match=message) as err:
            load_spec(rule(**extra))
        assert "s.yaml:" in str(err.value)
    variants = {v["title"]: v for v in spec_json_schema()["$defs"]["TunerRule"]["oneOf"]}
    assert "layout" in variants["adapter"]["properties"] and "layout" not in variants["lora"]["properties"]

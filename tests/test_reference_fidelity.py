"""The options that make the reference specs match the official code (issue 20, item 5).

- ``dropout`` on ``adapter`` (the bottleneck) and ``prompt`` (the tokens): active in training only, so in
  eval the output equals the same tuner's without it; it adds no parameter, changes no init draw, and leaves
  spec hashes and tuner-file identities alone (a tuner file trained with another dropout still loads);
- ``prompt``'s ``init: vpt``: VPT's uniform(+-sqrt(6 / (3 p^2 + C))), refused where no patch embedding sizes it;
- ``ssf`` with ``init_std > 0`` no longer claims to be the identity at init;
- the reference specs set what the official code does (AdaptFormer, NOAH, Convpass, VPT, SSF).

timm's ``test_vit`` (C = 64, patch 16, 6 blocks) at 32 px; a one-block ViT-B/16 where ViT-B's numbers matter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_cli_user import ok, utune
from utune.engine.build import Built, build
from utune.export.merge import forward_eval, merged_state_dict, plain_model
from utune.export.tuners_only import tuners_hash
from utune.spec import load_spec, spec_hash, spec_to_dict
from utune.tuners.registry import describe_kinds

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs" / "vit_b16_cifar100"
MODEL = {"name": "test_vit", "pretrained": False, "num_classes": 10, "img_size": 32}

# A tuner whose dropout acts on what reaches the output once its weights are not at their init (adapters
# start with W_up = 0 and parallel prompts with s = 0, where no dropout could show).
CASES: dict[str, dict[str, Any]] = {
    "adapter-parallel": {"kind": "adapter", "at": "blocks.*.mlp"},
    "adapter-noah": {
        "kind": "adapter",
        "at": "blocks.*.mlp",
        "placement": "sequential",
        "act": "quick_gelu",
        "scale": "none",
        "init": "xavier",
    },
    "prompt-concat": {"kind": "prompt", "at": "blocks.*"},
    "prompt-parallel": {"kind": "prompt", "at": "blocks.*.attn", "placement": "parallel"},
}


def spec_with(rule: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": 1, "model": model or MODEL, "tuners": [{"name": "u", **rule}], "trainable": ["head"]}


def tuner_state(built: Built) -> dict[str, torch.Tensor]:
    return {k: v for k, v in built.model.state_dict().items() if k.startswith("utune.")}


def batch(built: Built, n: int = 4) -> torch.Tensor:
    return torch.randn(n, *built.input_size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", list(CASES))
def test_dropout_acts_in_training_only_and_changes_nothing_else(case: str) -> None:
    plain = build(spec_with(CASES[case]))
    dropped = build(spec_with({**CASES[case], "dropout": 0.5}))
    # the same parameters, drawn the same (nn.Dropout draws nothing at construction)
    assert dropped.report["tuner_params"] == plain.report["tuner_params"] > 0
    state = tuner_state(plain)
    assert state.keys() == tuner_state(dropped).keys()
    assert all(torch.equal(v, tuner_state(dropped)[k]) for k, v in state.items())
    # move every tuner weight off its init, the same in both models
    with torch.no_grad():
        for name, p in plain.model.named_parameters():
            if name.startswith("utune."):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    dropped.model.load_state_dict(plain.model.state_dict())
    x = batch(plain)
    with torch.no_grad():
        ref = forward_eval(plain.model, x)
        assert torch.equal(forward_eval(dropped.model, x), ref), "eval: dropout must be absent"
        assert torch.equal(plain.model.train()(x), ref), "the base has no dropout of its own: train == eval"
        dropped.model.train()
        first, second = dropped.model(x), dropped.model(x)
    assert not torch.allclose(first, ref) and not torch.allclose(first, second), "train: dropout must act"
    loss = dropped.model(x).square().mean()
    loss.backward()
    tuners = [(n, p) for n, p in dropped.model.named_parameters() if n.startswith("utune.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in tuners)


def test_dropout_and_init_leave_hashes_and_tuner_files_alone() -> None:
    """Runs are named by the spec hash and tuner files keyed by the tuners hash: an option added with a
    default that builds what was built before must not rename finished runs; dropout and the prompt init
    change no trained weight, so a tuner file loads whatever they were."""
    import hashlib
    import json

    from utune.spec.load import HASH_NEUTRAL_DEFAULTS

    rules = [
        {"name": "a", "kind": "adapter", "at": "blocks.*.mlp"},
        {"name": "p", "kind": "prompt", "at": "blocks.*"},
    ]
    spec = load_spec({"version": 1, "model": MODEL, "tuners": rules})
    older = spec_to_dict(spec)  # the resolved spec as a utune without these options (or that key) wrote it
    for section, key in HASH_NEUTRAL_DEFAULTS:  # every key added later with a hash-neutral default
        older[section].pop(key, None)
    for rule in older["tuners"]:
        for key in ("dropout", "init") if rule["kind"] == "prompt" else ("dropout",):
            del rule[key]
    canonical = json.dumps(older, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec_hash(spec) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    changed = load_spec(spec, ["tuners.0.dropout=0.1", "tuners.1.dropout=0.1", "tuners.1.init=vpt"])
    assert spec_hash(changed) != spec_hash(spec)  # a different run...
    assert tuners_hash(changed) == tuners_hash(spec)  # ...whose tuner file loads into either spec


def test_vpt_init_draws_within_vpts_bound() -> None:
    """uniform(+-sqrt(6 / (3 p^2 + C))): +-0.0625 on ViT-B/16 (C = 768, p = 16), concat and parallel."""
    vit_b = {
        "name": "vit_base_patch16_224",
        "pretrained": False,
        "num_classes": 10,
        "kwargs": {"img_size": 32, "depth": 1},
    }
    for model, bound in ((MODEL, math.sqrt(6 / (3 * 16 * 16 + 64))), (vit_b, 0.0625)):
        for placement, at in (("concat", "blocks.*"), ("parallel", "blocks.*.attn")):
            built = build(spec_with({"kind": "prompt", "at": at, "placement": placement, "init": "vpt"}, model))
            tokens = torch.cat([v.flatten() for k, v in tuner_state(built).items() if k.endswith("tokens")])
            assert tokens.numel() >= 3_840  # 6 blocks (test_vit) or 1 block (ViT-B) x L x C
            assert float(tokens.abs().max()) <= bound
            assert float(tokens.abs().max()) > 0.99 * bound  # thousands of draws fill the range
            assert float(tokens.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform, not normal
    normal = build(spec_with({"kind": "prompt", "at": "blocks.*"}))  # the default stays N(0, 0.02)
    tokens = torch.cat([v.flatten() for v in tuner_state(normal).values()])
    assert float(tokens.std()) == pytest.approx(0.02, rel=0.05)


def test_ssf_claims_identity_only_at_init_std_zero() -> None:
    rule = {"kind": "ssf", "at": {"path": ["blocks.*.norm1"], "type": "LayerNorm"}}
    exact = build(spec_with(rule), verify=True)
    drawn = build(spec_with({**rule, "init_std": 0.02}), verify=True)
    assert exact.report["tuners"][0]["identity_at_init"] is True and exact.report["identity_max_abs_diff"] == 0
    assert drawn.report["tuners"][0]["identity_at_init"] is False and drawn.report["identity_max_abs_diff"] > 0
    ssf = next(k for k in describe_kinds() if k["kind"] == "ssf")
    assert ssf["identity_at_init"] == {"sequential": True}  # the default (init_std 0) is the identity


def test_ssf_reference_sites_fold_into_a_plain_model() -> None:
    """ssf.yaml's selector on test_vit: SSF's sites, and every gamma/beta folds (its `export.merge: true`)."""
    rule = load_spec(SPECS / "ssf.yaml").tuners[0]
    built = build(spec_with({"kind": "ssf", "at": rule.at.model_dump(), "init_std": 0.02}))
    sites = list(built.report["tuners"][0]["sites"])
    per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert sites == ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(6) for s in per_block], "norm"]
    c, hidden = 64, built.base.blocks[0].mlp.fc1.out_features  # test_vit: C = 64, fc1 to 3C
    per_channel = c + 6 * (c + 3 * c + c + c + hidden + c) + c  # embedding, 6 x (norm1 qkv proj norm2 fc1 fc2), norm
    assert built.report["tuners"][0]["params"] == 2 * per_channel  # gamma and beta
    result = merged_state_dict(built)
    merged = plain_model(built)
    merged.load_state_dict(result.state, strict=True)
    x = batch(built)
    tuned = forward_eval(built.model, x)
    assert float((forward_eval(merged, x) - tuned).abs().max()) <= 1e-5 * float(tuned.abs().max())


# ---- the reference specs say what the official code does ---------------------------------------------------

OFFICIAL: dict[str, dict[str, dict[str, Any]]] = {
    "adaptformer.yaml": {"adaptformer": {"dropout": 0.1, "dim": 64, "act": "relu", "scale": 0.1, "init": "zero"}},
    "noah_subnet.yaml": {
        name: {"dropout": 0.1}
        for name in ("prompt", "lora_r10", "lora_r5", "lora_r1", "adapter_d10", "adapter_d5", "adapter_d1")
    },
    "convpass.yaml": {name: {"conv_init": "identity", "dropout": 0.1, "scale": 0.1} for name in ("mha", "ffn")},
    "vpt_deep.yaml": {"prompt": {"init": "vpt", "dropout": 0.0}},
    "vpt_shallow.yaml": {"prompt": {"init": "vpt", "dropout": 0.0}},
    "ssf.yaml": {"ssf": {"init_std": 0.02}},
    "glora.yaml": {"glora": {"rank": 4, "a_b": "lora", "c": "lora"}},  # X_u: Kaiming, not xavier (the header)
    "fact_tk.yaml": {"fact": {"form": "tk", "rank": 32, "scale": 0.1, "dropout": 0.1}},  # the MLP slices (header)
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_reference_specs_set_the_official_values(name: str) -> None:
    spec = load_spec(SPECS / name)
    options = {rule.name: rule.options.model_dump() for rule in spec.tuners}
    for rule, expected in OFFICIAL[name].items():
        assert {k: options[rule][k] for k in expected} == expected, f"{name}: rule {rule}"
    header = "".join(line for line in (SPECS / name).read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "difference" in header, f"{name}: the header should say what difference remains (or that none does)"


# ---- as a user types it --------------------------------------------------------------------------------------

USER_SPEC = """\
version: 1
model: {{name: test_vit, img_size: 32}}
tuners:
  - {{name: prompt, kind: prompt, at: "blocks.*"{prompt}}}
  - {{name: adapter, kind: adapter, at: "blocks.*.mlp"{adapter}}}
trainable: [head]
data: {{dataset: digits, augment: false, num_workers: 0}}
train: {{epochs: 1, max_steps: 2, batch_size: 32, log_every: 1}}
"""


def test_cli_trains_with_dropout_and_loads_the_tuners_into_a_spec_without(tmp_path: Path) -> None:
    (tmp_path / "noisy.yaml").write_text(USER_SPEC.format(prompt=", dropout: 0.1, init: vpt", adapter=", dropout: 0.1"))
    (tmp_path / "plain.yaml").write_text(USER_SPEC.format(prompt="", adapter=""))
    ok(utune("apply", "noisy.yaml", "--train", cwd=tmp_path))
    exported = ok(utune("export", "--tuners-only", "--format", "json", cwd=tmp_path)).json()
    assert isinstance(exported, dict)
    loaded = ok(utune("apply", "plain.yaml", "--tuners", exported["path"], "--dry-run", "--verify", cwd=tmp_path))
    assert "verify:" in loaded.out


def test_cli_refuses_bad_dropout_and_vpt_init_without_a_patch_embedding(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(USER_SPEC.format(prompt="", adapter=", dropout: 1.0"))
    r = utune("apply", "bad.yaml", "--dry-run", cwd=tmp_path)
    assert r.code == 2 and "Traceback" not in r.err
    assert "bad.yaml:5" in r.err and "dropout" in r.err
    hybrid = USER_SPEC.format(prompt=", init: vpt", adapter="").replace(
        "test_vit, img_size: 32", "vit_tiny_r_s16_p8_224, img_size: 64, num_classes: 10, pretrained: false"
    )
    (tmp_path / "hybrid.yaml").write_text(hybrid)
    r = utune("apply", "hybrid.yaml", "--dry-run", cwd=tmp_path)
    assert r.code == 2 and "Traceback" not in r.err
    assert "init: vpt" in r.err and "patch" in r.err and "init: normal" in r.err
    assert not list(tmp_path.glob("runs/*")), "a refused spec leaves nothing behind"


def test_options_are_listed_as_runtime_only() -> None:
    kinds = {k["kind"]: k["options"] for k in describe_kinds()}
    assert kinds["adapter"]["dropout"] == {**kinds["adapter"]["dropout"], "default": 0.0, "runtime_only": True}
    assert kinds["prompt"]["dropout"]["runtime_only"] and kinds["prompt"]["init"]["runtime_only"]
    assert kinds["prompt"]["init"]["default"] == "normal"
    assert (kinds["prompt"]["init"]["schema"]) == {"type": "string", "enum": ["normal", "vpt"]}


def test_every_vpt_spec_draws_vpts_init() -> None:
    """U-Tuning Table 8 compares VPT across backbones: every VPT spec draws its prompts as VPT's code does."""
    files = sorted((REPO / "specs").rglob("vpt_*.yaml"))
    assert len(files) == 8
    for f in files:
        assert [r.options.init for r in load_spec(f).tuners] == ["vpt"], f
        assert "init: vpt" in f.read_text().split("version: 1")[0], f"{f}: the header should say so"

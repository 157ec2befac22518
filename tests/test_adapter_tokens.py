"""A parallel adapter beside a stage that merges tokens (LeViT, MViTv2, Hiera: N = n² tokens in, m² out) pools
its tap on the token grid, as beside a CNN stage that downsamples: identity at init, and it trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utune.engine.build import build
from utune.tuners.adapter import Adapter, AdapterOptions


def test_an_adapter_pools_its_tokens_on_their_grid() -> None:
    adapter = Adapter(8, 16, AdapterOptions(dim=4, init="xavier", scale="none"), -1, 2, grid=4)
    x = torch.randn(2, 16, 8)  # a 4 x 4 grid of tokens, row-major
    pooled = F.avg_pool2d(x.reshape(2, 4, 4, 8).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(2, 4, 8)
    expected = adapter.up(adapter.act(adapter.down(pooled)))
    assert torch.allclose(adapter(x), expected, atol=1e-6)


def test_an_adapter_beside_levits_token_merging_stages_is_the_identity_and_trains() -> None:
    spec = {"version": 1, "model": {"name": "levit_128s", "pretrained": False, "num_classes": 3, "img_size": 64},
            "tuners": [{"name": "ad", "kind": "adapter", "at": "stages.*", "dim": 4}], "trainable": []}  # fmt: skip
    built = build(spec, verify=True)
    assert built.report["identity_max_abs_diff"] == 0.0
    grids = {e.site: built.model.get_submodule(e.module).grid for e in built.manifest.tuners()}
    assert grids["stages.0"] == 0 and grids["stages.1"] == 4 and grids["stages.2"] == 2  # 16 -> 4 -> 1 tokens
    model = built.model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = model.eval()(x).detach()
    for _ in range(2):
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
    assert not torch.allclose(model.eval()(x), before)

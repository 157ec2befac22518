"""Model names and weights: timm and torchvision names, local .safetensors/.pth files, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from utune.errors import ModelError
from utune.models import create_model, input_size


def test_timm_and_torchvision_names() -> None:
    assert type(create_model("test_vit", num_classes=3)).__name__ == "VisionTransformer"
    tv = create_model("torchvision:resnet18", num_classes=4)
    assert tv.fc.out_features == 4


@pytest.mark.parametrize(
    ("name", "close"),
    [("vit_bsae_patch16_224", "vit_base_patch16_224"), ("torchvision:resnet1", "torchvision:resnet18")],
)
def test_unknown_name_suggests_close_ones(name: str, close: str) -> None:
    with pytest.raises(ModelError) as e:
        create_model(name)
    assert close in (e.value.hint or "") and e.value.exit_code == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_a_new_head_is_skipped(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    source = create_model("test_vit", num_classes=1000)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a common checkpoint wrapper
    model = create_model("test_vit", pretrained=str(path), num_classes=10)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 10  # the 1000-class head in the file was skipped


def test_fp16_weights_load(tmp_path: Path) -> None:
    source = create_model("test_vit")
    save_file({k: v.half().contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = create_model("test_vit", pretrained=str(tmp_path / "w.safetensors"))
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight.half().float())


def test_wrong_missing_and_corrupt_weights_are_model_errors(tmp_path: Path) -> None:
    other = create_model("test_resnet")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ModelError, match="does not match|does not fit"):
        create_model("test_vit", pretrained=str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ModelError, match="does not exist"):
        create_model("test_vit", pretrained=str(tmp_path / "nope.safetensors"))
    good = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("test_vit").state_dict().items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot read weights file"):
        create_model("test_vit", pretrained=str(cut))
    (tmp_path / "w.bin2").write_text("x")
    with pytest.raises(ModelError, match="must end in"):
        create_model("test_vit", pretrained=str(tmp_path / "w.bin2"))


def test_pth_is_read_with_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pickle code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="cannot read weights file"):
        create_model("test_vit", pretrained=str(tmp_path / "evil.pth"))


def test_input_size_follows_the_model() -> None:
    assert input_size(create_model("test_vit")) == (3, 160, 160)
    assert input_size(create_model("vit_tiny_patch16_224", kwargs={"img_size": 32})) == (3, 32, 32)
    assert input_size(create_model("torchvision:vit_b_16", kwargs={"image_size": 32})) == (3, 32, 32)
    assert input_size(create_model("test_resnet"), 96) == (3, 96, 96)

"""Release checkpoints in every wrapping load; broken and foreign files get one clear error."""

import os

import pytest
import timm
import torch

from refiner_pl.errors import UserInputError
from refiner_pl.models import from_official_checkpoint, load_model, read_checkpoint, save_model


def eval_logits(model, fixture):
    with torch.no_grad():
        return model(fixture["input"])


@pytest.mark.parametrize("wrapper", ["plain", "state_dict_ema", "state_dict", "model", "module."])
def test_release_file_in_every_wrapping(release_fixture, tmp_path, wrapper):
    state_dict = release_fixture["state_dict"]
    if wrapper == "plain":
        payload = state_dict
    elif wrapper == "module.":
        payload = {"model": {f"module.{k}": v for k, v in state_dict.items()}}
    else:
        payload = {wrapper: state_dict, "epoch": 299}
    path = tmp_path / "release.pth"
    torch.save(payload, path)
    model = from_official_checkpoint(path)
    torch.testing.assert_close(
        eval_logits(model, release_fixture), release_fixture["eval_logits"], atol=1e-5, rtol=0
    )


def test_ema_weights_are_preferred(release_fixture):
    state_dict = release_fixture["state_dict"]
    broken = {k: torch.zeros_like(v) for k, v in state_dict.items()}
    model = from_official_checkpoint({"state_dict": broken, "state_dict_ema": state_dict})
    torch.testing.assert_close(
        eval_logits(model, release_fixture), release_fixture["eval_logits"], atol=1e-5, rtol=0
    )


def test_transfer_to_other_class_count_keeps_backbone(release_fixture):
    model = from_official_checkpoint(release_fixture["state_dict"], num_classes=3)
    assert model.head.out_features == 3 and model.aux_head.out_features == 3
    torch.testing.assert_close(
        model.blocks[1].attn.refiner.expand.weight,
        release_fixture["state_dict"]["blocks.1.attn.DLA.conv_exp.weight"],
    )


def test_save_model_round_trip(release_fixture, tmp_path):
    model = from_official_checkpoint(release_fixture["state_dict"])
    path = save_model(model, tmp_path / "refiner.pt")
    again = load_model(path)
    torch.testing.assert_close(
        eval_logits(again, release_fixture), eval_logits(model, release_fixture)
    )
    # from_official_checkpoint recognises our own format too
    torch.testing.assert_close(
        eval_logits(from_official_checkpoint(path), release_fixture),
        eval_logits(model, release_fixture),
    )
    assert not (tmp_path / "refiner.pt.tmp").exists()


def test_foreign_architecture_is_refused(tmp_path):
    deit = timm.create_model("deit_small_patch16_224", num_classes=10, img_size=32)
    with pytest.raises(UserInputError, match="not a Refiner-ViT state dict.*plain ViT/DeiT"):
        from_official_checkpoint(deit.state_dict())


def test_truncated_file_is_refused(release_fixture, tmp_path):
    path = tmp_path / "release.pth"
    torch.save(release_fixture["state_dict"], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated, damaged or not a PyTorch checkpoint"):
        from_official_checkpoint(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        from_official_checkpoint(tmp_path / "nope.pth")


def test_incomplete_state_dict_is_refused(release_fixture):
    state_dict = dict(release_fixture["state_dict"])
    del state_dict["blocks.2.attn.proj.weight"]
    with pytest.raises(UserInputError, match="does not match the architecture"):
        from_official_checkpoint(state_dict)


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": _CreatesFile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UserInputError, match="refused to load"):
        read_checkpoint(path)
    assert not marker.exists()
    assert os.path.getsize(path) > 0


def test_init_weights_from_release_at_other_resolution_and_classes(release_fixture):
    from refiner_pl.models import RefinerViT, init_weights_from

    args = from_official_checkpoint(release_fixture["state_dict"]).model_args
    model = RefinerViT(**{**args, "img_size": 64, "num_classes": 3})
    init_weights_from(model, {"state_dict_ema": release_fixture["state_dict"]})
    source = release_fixture["state_dict"]
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 257, 48) and model.head.out_features == 3


def test_init_weights_from_a_lightning_checkpoint_and_foreign_one(tmp_path):
    from refiner_pl.models import RefinerViT, init_weights_from

    source = RefinerViT(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5
    )
    lightning_ckpt = {
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
    }
    target = RefinerViT(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5
    )
    init_weights_from(target, lightning_ckpt)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    deeper = RefinerViT(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5
    )
    with pytest.raises(UserInputError, match="does not fit model RefinerViT: missing"):
        init_weights_from(deeper, lightning_ckpt)

"""The model computes what the release computes, and is a well-behaved timm model."""

import json

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

import refiner_pl  # noqa: F401  (registers the presets)
from refiner_pl.errors import UserInputError
from refiner_pl.models import (
    RefinerViT,
    count_parameters,
    from_official_checkpoint,
    set_fast_refiner,
    use_fast_refiner,
)

SPEC_PARAMS = {
    "refiner_vit_s": 25_408_656,
    "refiner_vit_m": 55_450_932,
    "refiner_vit_l": 81_150_192,
}


def small(**kwargs) -> RefinerViT:
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    return RefinerViT(**{**args, **kwargs})


@pytest.fixture(params=[True, False], ids=["fast", "modules"])
def fast_kernels(request):
    """Each release-fixture test runs with the fast CPU kernels on and with them off."""
    before = use_fast_refiner()
    set_fast_refiner(request.param)
    yield request.param
    set_fast_refiner(before)


# ------------------------------------------------------------------ the release fixture
def test_eval_logits_match_release(release_fixture, fast_kernels):
    model = from_official_checkpoint(release_fixture["state_dict"])
    assert not model.training
    x = release_fixture["input"]
    with torch.no_grad():
        logits = model(x)
        cls_only = model.forward_cls(x)
        aux = model.aux_head(model.forward_features(x)[:, 1:])
    torch.testing.assert_close(logits, release_fixture["eval_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_only, release_fixture["eval_logits_cls_only"], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux, release_fixture["eval_logits_aux_tokens"], atol=1e-5, rtol=0)


# Train mode normalises by the statistics of a 4-image batch, where float32 rounding is
# large: the release's own float32 outputs are 8.5e-6 from the exact (float64) values. So the
# computation is checked in float64 at the fixture's 1e-5, and float32 (which rounds on both
# sides, differently on every CPU) within twice that.
TRAIN_FP32_ATOL = 2e-5


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-5), (torch.float32, TRAIN_FP32_ATOL)]
)
def test_train_logits_match_release_with_mixtoken_off(release_fixture, fast_kernels, dtype, atol):
    model = from_official_checkpoint(release_fixture["state_dict"]).to(dtype).train()
    with torch.no_grad():
        out = model.forward_train(release_fixture["input"].to(dtype), mix_token=False)
    assert out.box is None and out.lam == 1.0
    for got, key in (
        (out.cls_logits, "train_logits_cls"),
        (out.aux_logits, "train_logits_aux_tokens"),
    ):
        torch.testing.assert_close(got.float(), release_fixture[key], atol=atol, rtol=0)


def test_release_config_is_inferred_from_tensors(release_fixture):
    cfg = release_fixture["config"]
    args = from_official_checkpoint(release_fixture["state_dict"]).model_args
    assert args["img_size"] == (cfg["img_size"],) * 2
    assert args["patch_size"] == cfg["patch_size"]
    assert args["num_classes"] == cfg["num_classes"]
    assert args["embed_dim"] == cfg["embed_dim"]
    assert args["num_heads"] == cfg["num_heads"]
    assert args["mlp_ratio"] == cfg["mlp_ratio"]
    assert args["block_types"] == ["shared" if s else "plain" for s in cfg["share_pattern"]]


@pytest.mark.parametrize(
    "name",
    # L: 81 M parameters take ~4 s to build
    [pytest.param(n, marks=pytest.mark.slow) if "_l" in n else n for n in sorted(SPEC_PARAMS)],
)
def test_release_shapes_convert_and_load_strictly(name, fixtures_dir):
    shapes = json.loads((fixtures_dir / "official_state_dict_shapes.json").read_text())[name]
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        key: torch.randn(shape, generator=generator) if shape else torch.tensor(0)
        for key, shape in shapes["state_dict"].items()
    }
    model = from_official_checkpoint({"state_dict_ema": state_dict})
    assert count_parameters(model) == shapes["params_total"] == SPEC_PARAMS[name]
    preset = timm.create_model(name)
    assert count_parameters(preset) == SPEC_PARAMS[name]
    assert model.model_args["block_types"] == preset.block_types
    ours = model.state_dict()
    key = "blocks.1.attn.refiner.local.weight"
    torch.testing.assert_close(ours[key], state_dict["blocks.1.attn.DLA.depth_sep_conv.weight"])


# ------------------------------------------------------------------ timm integration
def test_timm_create_model_with_other_classes_and_size():
    model = timm.create_model("refiner_vit_s", num_classes=10, img_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    assert model.pretrained_cfg["crop_pct"] == 0.9
    assert timm.create_model("refiner_vit_l").pretrained_cfg["crop_pct"] == 1.13


def test_presets_are_listed_in_timm():
    assert {"refiner_vit_tiny", "refiner_vit_s", "refiner_vit_m", "refiner_vit_l"} <= set(
        timm.list_models("refiner_vit_*")
    )


def test_timm_pretrained_file_loads_release_weights(release_fixture, tmp_path):
    path = tmp_path / "release.pth"
    torch.save(
        {"model": {f"module.{k}": v for k, v in release_fixture["state_dict"].items()}}, path
    )
    model = timm.create_model(
        "refiner_vit_tiny",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": 10},
        embed_dim=48,
    ).eval()
    with torch.no_grad():
        logits = model(release_fixture["input"])
    torch.testing.assert_close(logits, release_fixture["eval_logits"], atol=1e-5, rtol=0)


def test_timm_model_api():
    model = small()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == model.model_args["depth"] + 2  # stem, every block, head
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.aux_head.out_features == 7
    assert model.forward_head(
        model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True
    ).shape == (2, 32)


# ------------------------------------------------------------------ resolution
def test_img_size_not_divisible_by_patch_is_refused():
    with pytest.raises(
        UserInputError, match=r"not divisible by patch_size 16: use a multiple of 16"
    ):
        timm.create_model("refiner_vit_s", img_size=230)


def test_other_input_sizes_run_with_resampled_pos_embed():
    model = small().eval()
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 3, 30, 32))


def test_checkpoint_on_other_grid_resamples_pos_embed(release_fixture):
    from timm.layers import resample_abs_pos_embed

    model = from_official_checkpoint(release_fixture["state_dict"], img_size=64)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 48)
    expected = resample_abs_pos_embed(
        release_fixture["state_dict"]["pos_embed"], [16, 16], [8, 8], num_prefix_tokens=1
    )
    torch.testing.assert_close(model.pos_embed.data, expected)
    # and the same through plain load_state_dict (e.g. a Lightning checkpoint)
    bigger = small(img_size=64)
    bigger.load_state_dict(small().state_dict())
    assert bigger.pos_embed.shape == (1, 257, 32)


# ------------------------------------------------------------------ training
def test_mixtoken_train_forward_backward_is_finite():
    torch.manual_seed(0)
    model = small().train()
    x = torch.randn(4, 3, 32, 32)
    boxes = []
    for _ in range(5):
        out = model.forward_train(x)
        loss = out.cls_logits.logsumexp(-1).mean() + out.aux_logits.logsumexp(-1).mean()
        loss.backward()
        boxes.append(out.box)
        top, left, bottom, right = out.box
        assert out.lam == pytest.approx(1 - (bottom - top) * (right - left) / 64)
        assert torch.isfinite(out.cls_logits).all() and torch.isfinite(out.aux_logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(top < bottom and left < right for top, left, bottom, right in boxes)


def test_mixtoken_is_never_active_in_eval():
    torch.manual_seed(0)
    model = small().eval()
    x = torch.randn(4, 3, 32, 32)
    out = model.forward_train(x, mix_token=True)
    assert out.box is None and out.lam == 1.0
    with torch.no_grad():
        torch.testing.assert_close(out.cls_logits, model.forward_cls(x))


def test_mixtoken_swaps_patch_logits_back():
    """Inside the box, sample i's patch logits come from the features of the patches
    that were mixed in from sample B-1-i, so after the swap-back they line up with the
    image whose content they saw."""
    torch.manual_seed(0)
    model = small().train()
    x = torch.randn(2, 3, 32, 32)
    model.sample_mix_box = lambda grid: ((2, 2, 6, 6), 1 - 16 / 64)
    out = model.forward_train(x)
    with torch.no_grad():
        tokens = model.forward_features(x, (2, 2, 6, 6))
        raw = model.aux_head(tokens[:, 1:]).reshape(2, 8, 8, -1)
    aux = out.aux_logits.reshape(2, 8, 8, -1).detach()
    torch.testing.assert_close(aux[0, 2:6, 2:6], raw[1, 2:6, 2:6])
    torch.testing.assert_close(aux[0, 0, 0], raw[0, 0, 0])


@pytest.mark.parametrize("switch", ["set_grad_checkpointing", "set_refiner_checkpointing"])
def test_checkpointing_matches_and_keeps_batchnorm_stats_exact(switch):
    """Whole-block and refiner-only recomputation give the same step as storing everything,
    and the recomputed BatchNorms do not update their running statistics a second time."""
    torch.manual_seed(0)
    plain, ckpt = small().train(), small().train()
    ckpt.load_state_dict(plain.state_dict())
    getattr(ckpt, switch)(True)
    x = torch.randn(2, 3, 32, 32)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------ configurability
def test_refiner_off_is_a_plain_vit():
    model = RefinerViT(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=10,
        refiner=False,
        stem="linear",
        token_head=False,
    )
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "refiner" in n or "adapt_bn" in n or "aux_head" in n]
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=3.0,
        num_classes=10,
        init_values=1e-5,
    )
    # timm's ViT scales both branches (ls1, ls2); the release only the MLP branch.
    assert count_parameters(model) == count_parameters(vit) - 4 * 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_block_kinds_expansion_and_kernel_are_configurable():
    model = small(
        block_types=["refine", "shared", "plain", "refine"],
        refiner_expansion=4,
        refiner_kernel_size=5,
    )
    assert model.blocks[0].attn.refiner.expand.weight.shape == (16, 4, 1, 1)
    assert model.blocks[0].attn.refiner.local.weight.shape == (16, 1, 5, 5)
    assert model.blocks[0].attn.v is None and model.blocks[1].attn.qkv is None
    assert model.blocks[2].attn.refiner is None and model.blocks[2].attn.adapt_bn is None
    out = model.train()(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_types=["shared", "plain", "plain", "plain"]), "start with 'plain'"),
        (dict(block_types=["plain"] * 3), "one kind per block"),
        (dict(block_types=["plain", "fancy", "plain", "plain"]), "must be one of"),
        (dict(refiner_kernel_size=4), "must be odd"),
        (dict(num_heads=5), "not divisible by num_heads"),
        (dict(patch_size=3, img_size=33), "even patch size"),
        (dict(stem="resnet"), "use 'conv' or 'linear'"),
    ],
)
def test_bad_model_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        small(**kwargs)


def test_linear_stem_builds_and_loads_from_its_own_state_dict():
    model = small(stem="linear", token_head=False).eval()
    again = from_official_checkpoint(model.state_dict())
    assert again.model_args["stem"] == "linear" and not again.model_args["token_head"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


# ------------------------------------------------------------------ attention maps
def test_attention_maps_are_readable_without_changing_outputs():
    torch.manual_seed(0)
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        maps = model.forward_attention_maps(x)
        after = model(x)
    torch.testing.assert_close(before, after)
    assert len(maps) == 4
    assert maps[0].refined is None and maps[1].refined is not None
    assert maps[1].raw.shape == maps[1].refined.shape == (2, 4, 65, 65)
    # a shared block refines the map it was handed and hands the unrefined one on
    assert torch.equal(maps[1].raw, maps[0].raw)
    torch.testing.assert_close(maps[0].raw.sum(-1), torch.ones(2, 4, 65))


# ------------------------------------------------------------------ options
def test_channels_last_refiner_option_computes_the_same_function(release_fixture):
    model = from_official_checkpoint(release_fixture["state_dict"], refiner_channels_last=True)
    with torch.no_grad():
        out = model.train().forward_train(release_fixture["input"], mix_token=False)
    # Reordered sums, amplified by training-mode BatchNorm: close, though not to 1e-5.
    torch.testing.assert_close(
        out.cls_logits, release_fixture["train_logits_cls"], atol=5e-5, rtol=0
    )

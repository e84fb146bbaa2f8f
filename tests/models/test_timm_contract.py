"""Refiner-ViT keeps timm's model contract, as timm's ViTs do: factory device/dtype, feature
extraction, intermediates and pruning, fx, TorchScript, heads, input size."""

import copy

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import get_notrace_functions, get_notrace_modules

import refiner_pl  # noqa: F401  (registers the presets)
from refiner_pl.errors import UserInputError
from refiner_pl.models import RefinerViT

PRESETS = ["refiner_vit_tiny", "refiner_vit_s", "refiner_vit_m", "refiner_vit_l"]


def tiny(**kwargs) -> RefinerViT:
    torch.manual_seed(0)
    return timm.create_model("refiner_vit_tiny", **kwargs)


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ construction
def test_factory_device_and_dtype_place_every_tensor():
    model = timm.create_model("refiner_vit_s", device="meta", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}
    assert model.in_chans == 3 and model.head_hidden_size == model.num_features == 384
    with torch.device("meta"):
        logits = timm.create_model("refiner_vit_l").eval()(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and logits.device.type == "meta"


def test_unknown_model_argument_is_a_type_error():
    with pytest.raises(TypeError):
        timm.create_model("refiner_vit_tiny", not_a_model_arg=1)


# ------------------------------------------------------------------ heads
def test_no_classes_gives_the_pooled_features():
    """num_classes=0 returns what forward_head(pre_logits=True) returns, value for value,
    and not the token head's contribution on top of it."""
    model = tiny(num_classes=0).eval()
    x = images()
    with torch.no_grad():
        pooled = model(x)
        features = model.forward_features(x)
        expected = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, features[:, 0], atol=1e-6, rtol=0)

    classifier = tiny().eval()
    classifier.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(
            classifier(x), classifier.forward_features(x)[:, 0], atol=1e-6, rtol=0
        )


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = tiny().double().eval()
    model.reset_classifier(7)
    head, aux_head = model.get_classifier()
    for layer in (head, aux_head):
        assert layer.weight.dtype == torch.float64 and layer.out_features == 7
        assert not layer.training
    assert model(images().double()).shape == (2, 7)
    model.to(device="meta", dtype=torch.float32).train()
    model.reset_classifier(3)
    heads = model.get_classifier()
    assert all(p.device.type == "meta" for head in heads for p in head.parameters())
    assert all(m.training for m in model.modules())
    assert isinstance(tiny(token_head=False).get_classifier(), torch.nn.Linear)
    with pytest.raises(UserInputError, match="global_pool='token'"):
        model.reset_classifier(3, "avg")


# ------------------------------------------------------------------ intermediates, features
def test_forward_intermediates_shapes_and_final_features():
    model = tiny().eval()
    x = images(size=48)  # a 12x12 grid: other than the model's 8x8
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        features = model.forward_features(x)
        last_normed = model.forward_intermediates(
            x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True
        )
        early = model.forward_intermediates(x, indices=[1], stop_early=True)[1]
    assert [t.shape for t in taps] == [(2, 64, 12, 12)] * 4
    torch.testing.assert_close(final, features)
    # the last block's tokens through the final norm are forward_features' patch tokens
    torch.testing.assert_close(last_normed[0], features[:, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(early[0], taps[1])
    torch.testing.assert_close(taps[2].flatten(2).transpose(1, 2), model.forward_intermediates(
        x, indices=2, output_fmt="NLC", intermediates_only=True
    )[0])  # fmt: skip
    with pytest.raises(UserInputError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_pruned_model_keeps_its_taps_and_trains_every_parameter():
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    pruned = copy.deepcopy(model)
    kept = pruned.prune_intermediate_layers([0, 2])
    assert kept == [0, 2] and len(pruned.blocks) == 3 and pruned.num_classes == 0
    assert pruned.model_args["depth"] == 3 and pruned.model_args["block_types"] == [
        "plain",
        "shared",
        "plain",
    ]
    with torch.no_grad():
        again = pruned.forward_intermediates(x, indices=kept, intermediates_only=True)
    torch.testing.assert_close(again, [taps[0], taps[2]])
    pruned.train()
    taps = pruned.forward_intermediates(x, kept, intermediates_only=True)
    (sum(t.sum() for t in taps) + pruned.forward_features(x).sum()).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", PRESETS)
def test_features_only_gives_a_feature_pyramid(name):
    """timm's getter feature class over forward_intermediates: the last three blocks as maps
    (built on the meta device: only the shapes are checked here for the large presets)."""
    tiny_preset = name == "refiner_vit_tiny"
    device = "cpu" if tiny_preset else "meta"
    torch.manual_seed(0)  # the same weights as tiny()
    model = timm.create_model(name, features_only=True, device=device).eval()
    size = 32 if tiny_preset else 64
    x = torch.randn(1, 3, size, size, device=device)
    with torch.no_grad():
        maps = model(x)
    width, patch = model.feature_info.channels()[0], model.feature_info.reduction()[0]
    assert len(maps) == 3 and model.feature_info.channels() == [width] * 3
    assert all(m.shape == (1, width, size // patch, size // patch) for m in maps)
    if tiny_preset:  # and they are the full model's taps
        full = tiny().eval()
        with torch.no_grad():
            expected = full.forward_intermediates(x, indices=3, intermediates_only=True)
        torch.testing.assert_close(maps, expected)


# ------------------------------------------------------------------ input size
def test_dynamic_img_size_and_set_input_size():
    model = tiny().eval()
    x = images(size=48)
    assert model(x).shape == (2, 10)  # dynamic by default: pos_embed resampled on the fly
    fixed = tiny(dynamic_img_size=False).eval()
    with pytest.raises(ValueError, match="set_input_size"):
        fixed(x)
    expected = resample_abs_pos_embed(model.pos_embed, [12, 12], [8, 8], num_prefix_tokens=1)
    with torch.no_grad():
        before = model(x)
    model.pos_embed.requires_grad_(False)
    model.set_input_size(48)
    assert model.grid_size == (12, 12) and model.model_args["img_size"] == (48, 48)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed.data, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    with pytest.raises(UserInputError, match="patch_size=8 cannot be changed"):
        model.set_input_size(patch_size=8)


# ------------------------------------------------------------------ tracing, scripting
def test_fx_graph_computes_the_model_and_trains():
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    model = tiny().eval()
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    graph = create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer,
    )
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(graph(x).values())), model(x), atol=1e-5, rtol=1e-4)
    graph.train()
    next(iter(graph(x).values())).mean().backward()
    assert all(p.grad is not None for p in graph.parameters())


def test_torchscript_and_torch_jit_trace_compute_the_model():
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, x)  # checks that two traces give the same graph
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(traced(images(batch=2)), model(images(batch=2)))
    with pytest.raises(torch.jit.Error, match="does not split into 4px patches"):
        scripted(torch.randn(1, 3, 30, 32))
    features = tiny(features_only=True, out_indices=(0, 2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(features)(x), features(x))

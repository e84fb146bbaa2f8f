"""Attention-diversity metrics on hand-built maps with known values, and on a real model."""

import math

import pytest
import timm
import torch

import refiner_pl  # noqa: F401  (registers the presets)
from refiner_pl.analysis.attention import (
    attention_distance,
    attention_grid_image,
    attention_report,
    class_token_attention,
    collect_attention_maps,
    head_similarity,
    layer_similarity,
    series_maps,
)
from refiner_pl.errors import UserInputError

GRID = (3, 4)
TOKENS = 1 + GRID[0] * GRID[1]  # class token + patches


def one_hot_rows(keys: list[int], tokens: int = TOKENS) -> torch.Tensor:
    """(N, N) map whose query q attends only to key keys[q]."""
    return torch.nn.functional.one_hot(torch.tensor(keys), tokens).float()


def patch(row: int, col: int) -> int:
    """Token index of a grid patch (after the class token)."""
    return 1 + row * GRID[1] + col


# --------------------------------------------------------------------------- heads
def test_identical_heads_have_similarity_one():
    head = torch.rand(2, 1, TOKENS, TOKENS).softmax(-1)
    assert head_similarity(head.expand(-1, 4, -1, -1)).item() == pytest.approx(1.0)


def test_heads_with_disjoint_support_have_similarity_zero():
    keys = torch.arange(TOKENS)
    heads = torch.stack([one_hot_rows(((keys + shift) % TOKENS).tolist()) for shift in range(3)])
    assert head_similarity(heads.unsqueeze(0)).item() == pytest.approx(0.0)


def test_head_similarity_averages_over_pairs():
    # heads 0 and 1 identical, head 2 disjoint: 2 of the 6 ordered pairs have similarity 1
    same = one_hot_rows([0] * TOKENS)
    other = one_hot_rows([1] * TOKENS)
    attn = torch.stack([same, same, other]).unsqueeze(0)
    assert head_similarity(attn).item() == pytest.approx(2 / 6)


def test_head_similarity_of_uniform_and_one_hot_rows():
    # cos(uniform, one-hot) = 1 / sqrt(N)
    uniform = torch.full((TOKENS, TOKENS), 1 / TOKENS)
    attn = torch.stack([uniform, one_hot_rows([3] * TOKENS)]).unsqueeze(0)
    assert head_similarity(attn).item() == pytest.approx(1 / math.sqrt(TOKENS))


def test_head_similarity_needs_two_heads():
    with pytest.raises(ValueError, match="at least 2 heads"):
        head_similarity(torch.rand(1, 1, TOKENS, TOKENS))


# --------------------------------------------------------------------------- layers
def test_layer_similarity_matrix():
    first = one_hot_rows([0] * TOKENS).expand(2, 3, -1, -1)
    disjoint = one_hot_rows([1] * TOKENS).expand(2, 3, -1, -1)
    matrix = layer_similarity([first, first.clone(), disjoint])
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(matrix, expected)


def test_layer_similarity_averages_heads_first():
    # two layers whose heads are the same maps in swapped order: the same layer map
    a, b = one_hot_rows([0] * TOKENS), one_hot_rows([1] * TOKENS)
    first, second = torch.stack([a, b]).unsqueeze(0), torch.stack([b, a]).unsqueeze(0)
    assert layer_similarity([first, second])[0, 1].item() == pytest.approx(1.0)


# ------------------------------------------------------------------------- distance
def test_attending_to_self_has_distance_zero():
    attn = torch.eye(TOKENS).expand(2, 3, -1, -1)
    torch.testing.assert_close(attention_distance(attn, GRID), torch.zeros(3))


def partner(row: int, col: int, step: tuple[int, int]) -> int:
    """The patch `step` away from (row, col), mirrored where it would leave the grid."""
    target = [row + step[0], col + step[1]]
    for axis, size in enumerate(GRID):
        if target[axis] >= size:
            target[axis] = (row, col)[axis] - step[axis]
    return patch(*target)


def map_to_partners(step: tuple[int, int], self_weight: float = 0.0) -> torch.Tensor:
    """Every patch query attends to its partner `step` away, with `self_weight` on itself;
    the class token's row and column get weight the distance must ignore."""
    attn = torch.zeros(TOKENS, TOKENS)
    attn[0, patch(GRID[0] - 1, GRID[1] - 1)] = 1.0  # the class token looks far away
    for row in range(GRID[0]):
        for col in range(GRID[1]):
            query = patch(row, col)
            attn[query, 0] = 0.5  # attention to the class token: no position, not counted
            attn[query, partner(row, col, step)] += 0.5 * (1 - self_weight)
            attn[query, query] += 0.5 * self_weight
    return attn[None, None]


@pytest.mark.parametrize(
    ("step", "distance"), [((0, 1), 1.0), ((0, 2), 2.0), ((1, 1), 2**0.5), ((1, 2), 5**0.5)]
)
def test_attending_to_a_patch_at_distance_d(step, distance):
    assert attention_distance(map_to_partners(step), GRID).item() == pytest.approx(distance)


def test_distance_is_the_attention_weighted_mean():
    attn = map_to_partners((0, 2), self_weight=0.25)
    assert attention_distance(attn, GRID).item() == pytest.approx(0.75 * 2.0)


def test_distance_per_head_and_signed_maps():
    # head 0 local, head 1 two patches away; a negative weight counts by its size
    far = map_to_partners((0, 2))
    attn = torch.cat([torch.eye(TOKENS)[None, None], -far], dim=1)
    torch.testing.assert_close(attention_distance(attn, GRID), torch.tensor([0.0, 2.0]))


def test_distance_checks_the_grid():
    with pytest.raises(ValueError, match="do not fit 1 prefix tokens and a 4x4 grid"):
        attention_distance(torch.rand(1, 1, TOKENS, TOKENS), (4, 4))


# ------------------------------------------------------------------------ the model
def tiny_model(refiner: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("refiner_vit_tiny", refiner=refiner)


def test_series_of_a_refiner_and_of_a_plain_vit():
    images = torch.randn(2, 3, 32, 32)
    maps, grid = collect_attention_maps(tiny_model(refiner=True), images)
    assert grid == (8, 8)
    series = series_maps(maps)
    # plain, shared, plain, shared: the plain blocks apply their raw maps
    assert series["refined"][0] is maps[0].raw and series["refined"][1] is maps[1].refined
    plain_maps, _ = collect_attention_maps(tiny_model(refiner=False), images)
    assert series_maps(plain_maps)["refined"] is None


def test_collect_restores_train_mode_and_report_is_batch_independent():
    model = tiny_model(refiner=True).train()
    model.blocks[0].eval()  # a frozen part stays as it was
    images = torch.randn(6, 3, 32, 32)
    whole = attention_report(model, [images])
    split = attention_report(model, [images[:4], images[4:]])
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert whole["images"] == split["images"] == 6
    assert whole["layers"] == 4 and whole["heads"] == 4 and whole["grid"] == [8, 8]
    for series in ("raw", "refined"):
        for key, value in whole[series].items():
            torch.testing.assert_close(torch.tensor(split[series][key]), torch.tensor(value))
    raw = whole["raw"]
    # a shared block's raw map is the one handed on: it repeats the block before. Its
    # similarity is a float32 sum of 6 x 65 x 65 = 25,350 products of normalised rows, whose
    # rounding error grows like sqrt(terms) x eps = 2e-5 (the order depends on the threads)
    assert raw["layer_similarity"][0][1] == pytest.approx(1.0, rel=2e-5)
    assert raw["head_similarity"][1] == pytest.approx(raw["head_similarity"][0])
    assert len(raw["attention_distance_per_head"]) == 4
    assert all(0 < d < 8 * 2**0.5 for d in raw["attention_distance"])


def test_a_model_without_attention_maps_is_refused():
    with pytest.raises(UserInputError, match="does not expose its attention maps"):
        collect_attention_maps(torch.nn.Linear(2, 2), torch.zeros(1, 3, 32, 32))


def test_class_token_grid_image():
    images = torch.randn(2, 3, 32, 32)
    maps, grid = collect_attention_maps(tiny_model(refiner=True), images)
    cls_maps = class_token_attention([m.raw for m in maps], grid)
    assert cls_maps.shape == (2, 4, 8, 8)
    torch.testing.assert_close(cls_maps[:, 0], maps[0].raw[:, :, 0, 1:].mean(1).reshape(2, 8, 8))
    picture = attention_grid_image(images, cls_maps, tile=16)
    # two rows of five 16 px tiles (input + 4 layers) with make_grid's 2 px padding
    assert picture.shape == (3, 2 + 2 * 18, 2 + 5 * 18)
    assert picture.min() >= 0 and picture.max() <= 1

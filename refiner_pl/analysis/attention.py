"""Attention-diversity metrics: how alike the heads' and the layers' maps are, and how local.

The paper's claim is that the refiner makes attention maps more diverse across heads and
layers, and more local. These functions measure exactly that on the (B, H, N, N) maps of
:meth:`RefinerViT.forward_attention_maps` (query by key, N = prefix tokens + patch grid):

``head_similarity``     mean cosine similarity between the maps of two different heads;
``layer_similarity``    cosine similarity between the head-averaged maps of two layers;
``attention_distance``  mean query-to-key distance on the patch grid, in patches.

Each block has two maps, two *series* here:

``raw``      the map the block computed (softmax, plus the previous map when the model adds
             it) or, for a ``shared`` block, the map the block before handed on;
``refined``  the map the block multiplies with the values: its refined map where the block
             refines, its raw map otherwise. A model that refines nowhere (the plain-ViT
             baseline) has no ``refined`` series.

Refined maps are no longer probability distributions (the refiner adds a signed,
BatchNorm-scaled correction), so similarities take the maps as they are and the distance
weights each key by ``|A|``, the size of its contribution to the query's output.
Every function works on whole batches with tensor ops; the batch mean of a metric is exact
when batches are combined by their sizes (see :func:`attention_report`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import make_grid

from refiner_pl.errors import UserInputError
from refiner_pl.models.refiner_vit import AttentionMaps

__all__ = [
    "SERIES",
    "attention_distance",
    "attention_grid_image",
    "attention_report",
    "attention_summary",
    "class_token_attention",
    "collect_attention_maps",
    "head_similarity",
    "layer_similarity",
    "series_maps",
]

SERIES = ("raw", "refined")


def head_similarity(attn: Tensor) -> Tensor:
    """Mean pairwise cross-head similarity of one layer's maps ``attn`` (B, H, N, N).

    For every sample and query token, the cosine similarity between the attention rows of
    two different heads, averaged over all H(H-1) ordered head pairs, queries and samples
    (class token included). Identical heads give 1, heads that attend to disjoint keys 0.
    A scalar; needs at least two heads.
    """
    heads = attn.shape[1]
    if heads < 2:
        raise ValueError(f"head_similarity needs at least 2 heads, got {heads}")
    rows = F.normalize(attn.float(), dim=-1)  # unit rows (an all-zero row stays zero)
    # sum over pairs h != g of <r_h, r_g> = |sum_h r_h|^2 - sum_h |r_h|^2, without H x H
    total = rows.sum(dim=1).square().sum(dim=-1)
    own = rows.square().sum(dim=(1, -1))
    return ((total - own) / (heads * (heads - 1))).mean()


def layer_similarity(maps: Sequence[Tensor]) -> Tensor:
    """Cross-layer similarity matrix (L, L) of the layers' maps, each (B, H, N, N).

    Entry (l, m) is the cosine similarity between the head-averaged maps of layers l and m,
    taken row by row (per query token) and averaged over queries and samples. Heads are
    averaged first because head h of one layer has no counterpart in another. The diagonal
    is 1 (for non-zero maps); adjacent layers are ``matrix.diagonal(1)``.
    """
    averaged = torch.stack([m.float().mean(dim=1) for m in maps])  # (L, B, N, N)
    rows = F.normalize(averaged, dim=-1)
    batch, tokens = averaged.shape[1], averaged.shape[2]
    return torch.einsum("lbqk,mbqk->lm", rows, rows) / (batch * tokens)


def patch_distances(grid: Sequence[int], device: torch.device | None = None) -> Tensor:
    """(P, P) Euclidean distances between the patches of a (gh, gw) grid, in patches."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
    return torch.cdist(positions, positions)


def attention_distance(attn: Tensor, grid: Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance per head, (H,), of one layer's maps ``attn`` (B, H, N, N).

    Only patch-to-patch attention counts: the first ``num_prefix_tokens`` tokens (the class
    token) are dropped as queries and as keys. Each query's weights ``|A|`` over the patch
    keys are normalised to sum to 1, the Euclidean distance between query and key patch (in
    patches) is averaged under them, then over queries and samples. A map that attends only
    to the query's own patch gives 0; one that attends only to a patch d away gives d.
    """
    patches = attn.shape[-1] - num_prefix_tokens
    if patches != grid[0] * grid[1]:
        raise ValueError(
            f"maps with {attn.shape[-1]} tokens do not fit {num_prefix_tokens} prefix tokens "
            f"and a {grid[0]}x{grid[1]} grid"
        )
    weights = attn[..., num_prefix_tokens:, num_prefix_tokens:].float().abs()
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = (weights * patch_distances(grid, attn.device)).sum(dim=-1)  # (B, H, P)
    return distance.mean(dim=(0, 2))


def series_maps(maps: Sequence[AttentionMaps]) -> dict[str, list[Tensor] | None]:
    """The ``raw`` and ``refined`` series of a model's maps (``refined`` is None when no
    block refines; otherwise a plain block contributes its raw map, the one it applies)."""
    refines = any(m.refined is not None for m in maps)
    return {
        "raw": [m.raw for m in maps],
        "refined": [m.raw if m.refined is None else m.refined for m in maps] if refines else None,
    }


def attention_summary(
    maps: Sequence[Tensor], grid: Sequence[int], num_prefix_tokens: int = 1
) -> dict[str, Tensor]:
    """All metrics of one series of maps (one (B, H, N, N) tensor per layer).

    Returns tensors: ``head_similarity`` (L,) (NaN for single-head layers),
    ``layer_similarity`` (L, L), ``adjacent_layer_similarity`` (L-1,) (layer l vs l+1),
    ``attention_distance`` (L,) and ``attention_distance_per_head`` (L, H).
    """
    per_head = torch.stack([attention_distance(m, grid, num_prefix_tokens) for m in maps])
    layers = layer_similarity(maps)
    return {
        "head_similarity": torch.stack(
            [head_similarity(m) if m.shape[1] > 1 else m.new_tensor(float("nan")) for m in maps]
        ),
        "layer_similarity": layers,
        "adjacent_layer_similarity": layers.diagonal(1),
        "attention_distance": per_head.mean(dim=1),
        "attention_distance_per_head": per_head,
    }


def collect_attention_maps(
    model: nn.Module, images: Tensor
) -> tuple[list[AttentionMaps], tuple[int, int]]:
    """A model's maps for ``images`` in eval mode, without gradients, and the patch grid.

    The train/eval mode of every submodule is restored afterwards.
    """
    if not hasattr(model, "forward_attention_maps"):
        raise UserInputError(
            f"{type(model).__name__} does not expose its attention maps "
            "(forward_attention_maps): use a refiner_vit_* model (model_kwargs "
            "{refiner: false} gives the plain-ViT baseline)"
        )
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            maps = model.forward_attention_maps(images)
    finally:
        for module, training in modes:
            module.training = training
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    return maps, grid


def attention_report(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Any]:
    """Every metric of both series over ``batches`` of images, as plain Python numbers.

    Batch results are combined weighted by batch size, so the result is the mean over all
    images whatever the batching (only one batch's maps are held at a time). Returns
    ``{"layers", "heads", "grid", "images", "block_types", "raw": {...}, "refined": {...}
    or None}`` with the keys of :func:`attention_summary` as (nested) lists.
    """
    totals: dict[str, dict[str, Tensor] | None] = {}
    count, grid, heads = 0, (0, 0), 0
    for images in batches:
        maps, grid = collect_attention_maps(model, images)
        heads = maps[0].raw.shape[1]
        for name, series in series_maps(maps).items():
            if series is None:
                totals[name] = None
                continue
            summary = attention_summary(series, grid, model.num_prefix_tokens)
            running = totals.get(name) or {key: torch.zeros_like(v) for key, v in summary.items()}
            totals[name] = {key: running[key] + v * len(images) for key, v in summary.items()}
        count += len(images)
    if count == 0:
        raise UserInputError("no images to analyse: the validation split is empty")
    return {
        "layers": len(model.blocks),
        "heads": heads,
        "grid": list(grid),
        "images": count,
        "block_types": list(getattr(model, "block_types", [])),
        **{
            name: None if series is None else {k: (v / count).tolist() for k, v in series.items()}
            for name, series in totals.items()
        },
    }


def class_token_attention(maps: Sequence[Tensor], grid: Sequence[int]) -> Tensor:
    """The class token's attention over the patches, head-averaged ``|A|``: (B, L, gh, gw)."""
    rows = [m[:, :, 0, -grid[0] * grid[1] :].float().abs().mean(dim=1) for m in maps]
    return torch.stack(rows, dim=1).reshape(rows[0].shape[0], len(rows), grid[0], grid[1])


def _hot(heat: Tensor) -> Tensor:
    """A black-red-yellow-white colour map for values in [0, 1]: (..., H, W) -> (..., 3, H, W)."""
    return torch.stack([heat * 3, heat * 3 - 1, heat * 3 - 2], dim=-3).clamp(0, 1)


def attention_grid_image(images: Tensor, cls_maps: Tensor, tile: int = 64) -> Tensor:
    """One (3, H, W) picture: a row per image, its input and then one heat map per layer.

    ``images`` (B, C, h, w) are shown min-max scaled; ``cls_maps`` (B, L, gh, gw) from
    :func:`class_token_attention`, each scaled to its own maximum, are drawn in a hot colour
    map over the dimmed grey image, with one patch per block of pixels.
    """
    batch, layers = cls_maps.shape[:2]
    shown = F.interpolate(images.float(), size=(tile, tile), mode="bilinear", antialias=True)
    low = shown.amin(dim=(1, 2, 3), keepdim=True)
    high = shown.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((shown - low) / (high - low).clamp_min(1e-12)).expand(-1, 3, -1, -1)
    grey = shown.mean(dim=1, keepdim=True).unsqueeze(1)  # (B, 1, 1, tile, tile)
    heat = cls_maps / cls_maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    heat = F.interpolate(heat, size=(tile, tile), mode="nearest")
    overlay = 0.75 * _hot(heat) + 0.25 * grey  # (B, L, 3, tile, tile)
    tiles = torch.cat([shown.unsqueeze(1), overlay], dim=1).reshape(-1, 3, tile, tile)
    return make_grid(tiles.cpu(), nrow=layers + 1, padding=2, pad_value=1.0)

"""Token labelling on the device: a batch's label-map crops become dense per-token targets,
and Mixup/CutMix mix those targets along with the images.

The data side (label-map files, the crop-remembering transform, the dataset) lives in
`refiner_pl.data.token_label`; it yields `TokenLabelBatch` samples, which the default collate
batches without changing their type, so the LightningModule tells them apart by type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target
from torch import Tensor
from torchvision.ops import roi_align

from refiner_pl.errors import UserInputError

__all__ = [
    "LabelMapCrop",
    "TokenLabelBatch",
    "TokenLabelMixup",
    "crop_label_maps",
    "crop_label_target",
    "dense_label_targets",
]


class LabelMapCrop(NamedTuple):
    """One sample's label map and the crop to cut from it (batched by the default collate).

    ``scores`` (k, H, W) float32 top-k logits and ``classes`` (k, H, W) int64 class indices
    are already flipped when the image was; index ``num_classes`` marks a teacher class the
    dataset does not have (dropped when building targets). ``box`` (4,) float32 is the
    image's crop as ``(x0, y0, x1, y1)`` fractions of this (flipped) map.
    """

    scores: Tensor
    classes: Tensor
    box: Tensor


class TokenLabelBatch(NamedTuple):
    """A token-labelling sample, or a batch of them (the default collate keeps the type)."""

    images: Tensor
    targets: Tensor
    crops: LabelMapCrop


def crop_label_maps(maps: Tensor, boxes: Tensor, grid_size: int | Sequence[int]) -> Tensor:
    """Cut each (C, H, W) map of ``maps`` (B, C, H, W) to its box and resample it to the grid.

    ``boxes`` (B, 4) holds ``(x0, y0, x1, y1)`` fractions of the map. Output cell (i, j)
    averages the map, bilinearly interpolated between cell centres, over that cell's part of
    the box (RoIAlign with ``aligned=True``: map cell (r, c) covers [c, c+1) x [r, r+1)).
    Returns (B, C, gh, gw).
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    height, width = maps.shape[-2:]
    scale = boxes.new_tensor([width, height, width, height])
    index = torch.arange(len(maps), device=maps.device, dtype=maps.dtype)[:, None]
    rois = torch.cat([index, boxes.to(maps.dtype) * scale.to(maps.dtype)], dim=1)
    return roi_align(maps, rois, output_size=(gh, gw), sampling_ratio=-1, aligned=True)


def dense_label_targets(
    crops: LabelMapCrop,
    num_classes: int,
    grid_size: int | Sequence[int],
    smoothing: float = 0.0,
) -> Tensor:
    """Dense soft targets (B, gh*gw, num_classes) from a batch of label-map crops.

    Scatters the top-k logits into zero maps over ``num_classes`` (+1 slot for dropped
    teacher classes, discarded), cuts them to the crop boxes on the ``grid_size`` grid
    (row-major, as the model's patch tokens), takes the softmax over classes and mixes in
    ``smoothing / num_classes`` uniform mass. Run it on the training device.
    """
    scores, classes, boxes = crops
    if scores.ndim != 4:
        raise ValueError(f"expected batched (B, k, H, W) label maps, got {tuple(scores.shape)}")
    batch, _, height, width = scores.shape
    maps = scores.new_zeros(batch, num_classes + 1, height, width)
    maps.scatter_(1, classes.clamp(0, num_classes), scores.float())
    logits = crop_label_maps(maps, boxes, grid_size)[:, :num_classes]
    probs = logits.softmax(dim=1)
    if smoothing:
        probs = probs * (1.0 - smoothing) + smoothing / num_classes
    return probs.flatten(2).transpose(1, 2)


def crop_label_target(crops: LabelMapCrop, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """The label map's verdict on the whole crop, (B, num_classes): RoIAlign to 1 x 1, softmax.

    An alternative class target for experiments; ImageClassifier trains the class token on
    the image's own (mixed) class label, as the spec's token-labelling loss does.
    """
    return dense_label_targets(crops, num_classes, 1, smoothing)[:, 0]


class TokenLabelMixup(Mixup):
    """timm's Mixup/CutMix (``mode='batch'``) that mixes dense token targets to match.

    Mixup blends every token's target with weight lam, like the class target. CutMix gives
    each token the share of its patch covered by the pasted box from the flipped batch (the
    release instead blends all tokens with lam). Apply it on the device, after
    :func:`dense_label_targets` and before the model.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.mode != "batch":
            raise UserInputError(
                f"mixup mode {self.mode!r} is not supported with token labels: use mode='batch'"
            )

    def __call__(  # type: ignore[override]
        self,
        x: Tensor,
        target: Tensor,
        dense: Tensor | None = None,
        grid_size: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Mix ``x`` (B, 3, H, W) in place; return it, soft class targets and mixed ``dense``.

        ``grid_size`` is the token grid of ``dense`` (B, gh*gw, C); None means square.
        """
        if len(x) % 2:
            raise ValueError("Mixup needs an even batch size")
        lam, use_cutmix = self._params_per_batch()
        coverage: Tensor | None = None
        if lam != 1.0:
            if use_cutmix:
                (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                    x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
                )
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
                if dense is not None:
                    grid = _grid(dense.shape[1], grid_size)
                    coverage = _box_coverage((yl, yh, xl, xh), x.shape[-2:], grid, x.device)
            else:
                flipped = x.flip(0).mul_(1.0 - lam)
                x.mul_(lam).add_(flipped)
        target = mixup_target(target, self.num_classes, lam, self.label_smoothing)
        if dense is not None and lam != 1.0:
            share = (1.0 - lam) if coverage is None else coverage.to(dense.dtype)[None, :, None]
            dense = dense * (1.0 - share) + dense.flip(0) * share
        return x, target, dense


def _grid(tokens: int, grid_size: Sequence[int] | None) -> tuple[int, int]:
    if grid_size is not None:
        gh, gw = grid_size
    else:
        gh = gw = math.isqrt(tokens)
    if gh * gw != tokens:
        raise ValueError(f"{tokens} dense targets do not fill a {gh} x {gw} token grid")
    return gh, gw


def _box_coverage(
    box: tuple[int, int, int, int],
    image_size: Sequence[int],
    grid: tuple[int, int],
    device: torch.device,
) -> Tensor:
    """Share of each token's patch inside the pixel box ``(yl, yh, xl, xh)``, flattened (N,)."""
    yl, yh, xl, xh = box

    def overlap(lo: int, hi: int, size: int, cells: int) -> Tensor:
        edges = torch.linspace(0, size, cells + 1, device=device, dtype=torch.float64)
        inside = (edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)).clamp(min=0)
        return inside / (size / cells)

    rows = overlap(yl, yh, image_size[0], grid[0])
    cols = overlap(xl, xh, image_size[1], grid[1])
    return (rows[:, None] * cols[None, :]).flatten().float()

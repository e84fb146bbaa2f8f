"""Training losses of the Refiner-ViT release: token labelling and the attention penalty.

Both follow the release; ``docs/architecture.md`` ("Training losses") describes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from refiner_pl.errors import UserInputError
from refiner_pl.models.refiner_vit import AttentionMaps, TokenLabelOutput

__all__ = ["TokenLabelLoss", "TokenLabelLossParts", "attention_similarity_penalty"]


class TokenLabelLossParts(NamedTuple):
    """The total loss and its two terms (unweighted), e.g. for logging."""

    loss: Tensor
    cls_loss: Tensor
    dense_loss: Tensor


class TokenLabelLoss(nn.Module):
    """``SoftCE(cls, mixed class target) + dense_weight * SoftCE(aux, dense targets)``.

    Takes :meth:`RefinerViT.forward_train`'s :class:`TokenLabelOutput`. Its ``aux_logits``
    are already swapped back inside the MixToken box, so patch token (b, n) predicts image
    b's own patch n: the dense targets are used as they are, *not* flipped. The class target
    of image b becomes ``lam * y[b] + (1 - lam) * y[B-1-b]``, lam being the share of the grid
    outside the box.

    Args:
        dense_weight: Weight of the patch-token term (the release: 0.5).
        label_smoothing: Smoothing for integer class targets; soft (B, C) targets, e.g. from
            timm Mixup, are used as given.
    """

    def __init__(self, dense_weight: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if dense_weight < 0:
            raise UserInputError(f"dense_weight is {dense_weight}: use >= 0 (0 disables it)")
        if not 0 <= label_smoothing < 1:
            raise UserInputError(f"label_smoothing is {label_smoothing}: use a value in [0, 1)")
        self.dense_weight = dense_weight
        self.label_smoothing = label_smoothing
        self.soft_ce = SoftTargetCrossEntropy()

    def class_target(self, target: Tensor, num_classes: int) -> Tensor:
        """(B, C) soft targets from integer labels (smoothed) or soft targets (unchanged)."""
        if target.is_floating_point():
            return target
        off = self.label_smoothing / num_classes
        soft = torch.full((len(target), num_classes), off, device=target.device)
        return soft.scatter_(1, target[:, None], 1.0 - self.label_smoothing + off)

    def parts(
        self, output: TokenLabelOutput, target: Tensor, dense_target: Tensor | None = None
    ) -> TokenLabelLossParts:
        """The loss and its terms.

        Args:
            output: ``forward_train``'s output (class logits (B, C), aux logits (B, N, C)).
            target: Class labels (B,) or soft class targets (B, C).
            dense_target: (B, N, C) soft targets for the patch tokens, aligned with the
                images; None uses each image's (unmixed) class target for all its tokens.
        """
        cls_logits, aux_logits, _, lam = output
        batch, tokens, num_classes = aux_logits.shape
        y = self.class_target(target, num_classes).float()  # targets stay float32 under AMP
        if y.shape != cls_logits.shape:
            raise ValueError(f"class target {tuple(y.shape)} != logits {tuple(cls_logits.shape)}")
        if dense_target is None:
            dense_target = y[:, None, :].expand(batch, tokens, num_classes)
        elif dense_target.shape != aux_logits.shape:
            raise ValueError(
                f"dense target {tuple(dense_target.shape)} != aux logits {tuple(aux_logits.shape)}"
            )
        if lam < 1.0:
            y = lam * y + (1.0 - lam) * y.flip(0)
        cls_loss = self.soft_ce(cls_logits, y)
        dense_loss = self.soft_ce(
            aux_logits.reshape(-1, num_classes), dense_target.reshape(-1, num_classes)
        )
        return TokenLabelLossParts(cls_loss + self.dense_weight * dense_loss, cls_loss, dense_loss)

    def forward(
        self, output: TokenLabelOutput, target: Tensor, dense_target: Tensor | None = None
    ) -> Tensor:
        """The total loss; see :meth:`parts`."""
        return self.parts(output, target, dense_target).loss


def attention_similarity_penalty(
    maps: Sequence[Tensor | AttentionMaps], num_pairs: int, weight: float = 0.1
) -> Tensor:
    """The release's optional penalty on similar attention maps in consecutive blocks.

    ``weight * sum_{i < num_pairs} mean(cos(maps[i], maps[i+1])) / num_pairs``, with the
    cosine taken, as in the release, over the heads axis (dim 1) of each (B, H, N, N) map at
    every (sample, query, key) position.

    ``maps`` are the maps the blocks hand on, first block first: the ``raw`` maps of
    :meth:`RefinerViT.forward_attention_maps` (``AttentionMaps`` are reduced to ``raw``). A
    shared block hands on the map it received, so with the release's plain/shared
    alternation every other pair compares a map with itself and adds a constant.
    """
    if num_pairs < 1 or len(maps) < num_pairs + 1:
        raise UserInputError(
            f"num_pairs={num_pairs} needs {num_pairs + 1} attention maps, got {len(maps)}: "
            f"use 1 <= num_pairs <= {max(len(maps) - 1, 1)} (depth - 1)"
        )
    handed_on = [m.raw if isinstance(m, AttentionMaps) else m for m in maps[: num_pairs + 1]]
    means = [
        F.cosine_similarity(handed_on[i], handed_on[i + 1], dim=1).mean() for i in range(num_pairs)
    ]
    return weight * torch.stack(means).sum() / num_pairs

"""Refiner-ViT ("Refiner: Refining Self-attention for Vision Transformers", Zhou et al. 2021).

One readable file in the style of timm's ``vision_transformer.py``: the layers, the model,
the release-checkpoint filter and the registered presets. The computation follows the
released models exactly (see ``REFINER_SPEC.md``); the options beyond the release
(block kinds, expansion, kernel size, stem, token head, refiner off) serve the ablations.

Block kinds, chosen per block with ``block_types``:

``plain``   softmax attention; adds ``scale * previous map`` when ``attn_map_residual``.
``refine``  like ``plain``, then refines its own fresh map before using it.
``shared``  computes no queries/keys: refines the map handed on by the previous block
            (the release alternates ``plain, shared, plain, shared, ...``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from refiner_pl.errors import UserInputError

__all__ = [
    "AttentionMaps",
    "AttentionRefiner",
    "RefinerViT",
    "TokenLabelOutput",
    "checkpoint_filter_fn",
    "release_to_refiner_pl",
]

_logger = logging.getLogger(__name__)

BlockType = Literal["plain", "refine", "shared"]
BLOCK_TYPES: tuple[str, ...] = ("plain", "refine", "shared")
RESIDUAL_SCALE = 0.5  # the release scales the residual branch input by 0.5 and its output by 2


class AttentionMaps(NamedTuple):
    """One block's attention maps, (B, H, N, N) each.

    ``raw`` is the map the block computed (``plain``/``refine``) or was handed (``shared``);
    ``refined`` is the map it actually multiplied with the values after refinement,
    ``None`` for plain blocks.
    """

    raw: torch.Tensor
    refined: torch.Tensor | None


class TokenLabelOutput(NamedTuple):
    """Training output for token labelling.

    ``box`` is the MixToken box on the patch grid as ``(top, left, bottom, right)`` (``None``
    when MixToken was off) and ``lam`` the share of the grid outside it, i.e. the weight of
    each sample's own class target.
    """

    cls_logits: torch.Tensor
    aux_logits: torch.Tensor
    box: tuple[int, int, int, int] | None
    lam: float


class ConvStem(nn.Module):
    """The release's convolutional patch stem: 7x7/2, 3x3, 3x3 convs with BN+ReLU, then a
    (p/2)x(p/2) projection with stride p/2, so the grid is img / p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, hidden, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden * 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden * 2)
        self.conv3 = nn.Conv2d(hidden * 2, hidden * 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(hidden * 4)
        self.proj = nn.Conv2d(hidden * 4, embed_dim, patch_size // 2, stride=patch_size // 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not self.bn1.training:
            # oneDNN's convolutions are ~20% faster channels-last. Not in training: PyTorch's
            # channels-last BatchNorm statistics differ from the release's by ~1e-5 there.
            x = x.contiguous(memory_format=torch.channels_last)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            if bn.training or not _whole_batchnorm(bn):
                x = self.act(bn(conv(x)))
            else:  # running statistics: fold the BatchNorm into the convolution
                weight, bias = _fold_bn(conv.weight, bn)
                x = F.conv2d(x, weight, bias, conv.stride, conv.padding).relu_()
        return _patchify_conv(self.proj, x)


def _whole_batchnorm(bn: nn.Module) -> bool:
    """Whether ``bn`` holds all of its tensors here (FSDP leaves a shard of 0 elements outside
    its unit's forward), with running statistics: only then may it be folded."""
    return bn.track_running_stats and all(
        t is None or t.numel() == bn.num_features
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    )


def _patchify_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A k x k convolution with stride k as one GEMM over the cut-out patches, returned
    channels-last. oneDNN runs this shape far below its GEMM speed, above all in backward
    (about 4x on CPU); on CUDA cuDNN does well, so the module runs there."""
    kernel = conv.kernel_size[0]
    batch, chans, height, width = x.shape
    if x.device.type != "cpu" or height % kernel or width % kernel:
        return conv(x)
    rows, cols = height // kernel, width // kernel
    if x.is_contiguous(memory_format=torch.channels_last) and chans > 1:
        # (B, H, W, C) memory: each patch row is k*C contiguous values, so cut (k, k, C)
        # patches and order the weight the same way
        patches = x.permute(0, 2, 3, 1).reshape(batch, rows, kernel, cols, kernel, chans)
        patches = patches.permute(0, 1, 3, 2, 4, 5)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    else:
        patches = x.reshape(batch, chans, rows, kernel, cols, kernel).permute(0, 2, 4, 1, 3, 5)
        weight = conv.weight.flatten(1)
    out = F.linear(patches.reshape(batch * rows * cols, -1), weight, conv.bias)
    return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


class LinearPatchEmbed(nn.Module):
    """The plain ViT patch embedding: one p x p convolution with stride p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _patchify_conv(self.proj, x)


class AttentionRefiner(nn.Module):
    """Refine(A) = A + BN(reduce(ReLU6(BN(dwconv(ReLU6(BN(expand(A)))))))).

    The (B, H, N, N) attention map is treated as an H-channel N x N image (query by key).
    """

    def __init__(
        self, num_heads: int, expansion: int = 3, kernel_size: int = 3, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        hidden = num_heads * expansion
        self.expand = nn.Conv2d(num_heads, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.local = nn.Conv2d(
            hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False
        )
        self.local_bn = nn.BatchNorm2d(hidden)
        self.reduce = nn.Conv2d(hidden, num_heads, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(num_heads)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        # Channels-last makes the 1x1 convs GEMMs over the heads and lets the depthwise conv
        # run without a padded copy (about a third less time on CPU). It reorders float sums,
        # which training-mode BatchNorm amplifies to ~1e-5 in the logits, so it is opt-in.
        x = attn.contiguous(memory_format=torch.channels_last) if self.channels_last else attn
        x = self.act(self.expand_bn(self.expand(x)))
        x = self.act(self.local_bn(self.local(x)))
        return self.reduce_bn(self.reduce(x)) + attn

    def forward_folded(self, attn: torch.Tensor, post_bn: nn.BatchNorm2d, post_scale: float):
        """``post_bn(forward(attn)) * post_scale`` with every BatchNorm folded into the convs.

        Only valid when the BatchNorms use running statistics (eval mode): three convs and
        one fused multiply-add instead of three convs, five normalisations and a multiply.
        """
        w1, b1 = _fold_bn(self.expand.weight, self.expand_bn)
        w2, b2 = _fold_bn(self.local.weight, self.local_bn)
        w3, b3 = _fold_bn(self.reduce.weight, self.reduce_bn)
        post_w, post_b = _bn_affine(post_bn)
        post_w, post_b = post_w * post_scale, post_b * post_scale
        # post(R + A) = R * w + b + A * w, and R's conv absorbs w and b
        w3 = w3 * post_w.view(-1, 1, 1, 1)
        b3 = b3 * post_w + post_b
        # out = A * w + b3 + W3 act2, the 1x1 reduce conv a GEMM accumulating into it. On CPU
        # a few samples at a time, so the 3H-channel maps of a chunk stay in cache.
        batch, heads = attn.shape[:2]
        maps = attn.reshape(batch, heads, -1)
        chunk = _chunk_size(attn, w1.shape[0])
        if chunk is None or torch.is_grad_enabled():
            # tracing, exporting, compiling, on a GPU or differentiating: one batch-wide pass
            out = torch.addcmul(b3.view(-1, 1), maps, post_w.view(-1, 1))
            # out of place: under autocast the GEMM's dtype may differ from out's
            operands = self._folded_reduce_operands(attn, w1, b1, w2, b2, w3)
            return torch.baddbmm(out, *operands).view_as(attn)
        out = torch.empty_like(maps)
        for start in range(0, batch, chunk):
            part, target = attn[start : start + chunk], out[start : start + chunk]
            torch.addcmul(
                b3.view(-1, 1), maps[start : start + chunk], post_w.view(-1, 1), out=target
            )
            target.baddbmm_(*self._folded_reduce_operands(part, w1, b1, w2, b2, w3, _WORKSPACE))
        return out.view_as(attn)

    def _folded_reduce_operands(
        self, attn: torch.Tensor, w1, b1, w2, b2, w3, workspace: _Workspace | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W3, act2) for one batched GEMM: the folded expand, depthwise conv and ReLU6s."""
        act1 = _expand_channels_last(attn, w1, b1, workspace).clamp_(0.0, 6.0)
        local = F.conv2d(act1, w2, padding=self.local.padding, groups=self.local.groups)
        act2 = _channel_rows(local).add_(b2).clamp_(0.0, 6.0)
        act2 = act2.view(attn.shape[0], -1, act2.shape[1]).transpose(1, 2)
        return w3.view(1, w3.shape[0], -1).expand(attn.shape[0], -1, -1), act2


CHUNK_BYTES = 8 * 2**20  # per expanded map of an eval chunk: one or two samples at 224 px


def _chunk_size(attn: torch.Tensor, hidden: int) -> int | None:
    """How many samples' expanded (hidden-channel) maps fit in ``CHUNK_BYTES``; ``None``
    (the whole batch at once) while tracing or exporting, which must keep the batch size
    symbolic, under autocast, whose dtypes the chunks' output buffers cannot follow, and on
    GPUs, which want large kernels."""
    if (
        attn.device.type != "cpu"
        or torch.is_autocast_enabled(attn.device.type)  # out= buffers need fixed dtypes
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    ):
        return None
    per_sample = hidden * attn[0, 0].numel() * attn.element_size()
    return max(1, min(attn.shape[0], CHUNK_BYTES // per_sample))


def _expand_channels_last(
    attn: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    workspace: _Workspace | None = None,
) -> torch.Tensor:
    """A 1x1 convolution of the (B, H, N, N) map to ``weight.shape[0]`` channels plus
    ``bias``, as a GEMM that reads the NCHW map and writes the result channels-last (into the
    workspace's ``act1`` when given)."""
    batch, heads, rows, cols = attn.shape
    maps_t = attn.reshape(batch, heads, -1).transpose(1, 2)
    weight_t = weight.view(-1, heads).t()
    if workspace is None:
        out = torch.matmul(maps_t, weight_t)
    else:
        out = workspace.get("act1", (batch, rows * cols, weight.shape[0]), attn)
        torch.bmm(maps_t, weight_t.expand(batch, -1, -1), out=out)
    out.add_(bias)
    return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift under running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _bn_affine(bn)
    return weight * scale.view(-1, 1, 1, 1), shift


def _batchnorm_momentum(bn: nn.BatchNorm2d) -> float:
    """Count the batch and return the running-average factor, as ``nn.BatchNorm2d`` does."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _update_running_stats(
    bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    factor = _batchnorm_momentum(bn)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.copy_(factor * mean + (1 - factor) * bn.running_mean.double())
    bn.running_var.copy_(factor * unbiased + (1 - factor) * bn.running_var.double())


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    """The (B*H*W, C) rows of a channels-last NCHW tensor (a view when it is contiguous)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _channel_sums(rows: torch.Tensor) -> torch.Tensor:
    """Column sums of (M, C) rows. Summing over the long axis with only C values per row is
    slow in PyTorch (~5x for C = 36); viewed k rows wide, the same sum vectorises."""
    count, channels = rows.shape
    wide = next(k for k in (8, 4, 2, 1) if count % k == 0)
    return rows.reshape(-1, wide * channels).sum(0).view(wide, channels).sum(0)


def _bn_backward_rows(
    grad_rows: torch.Tensor, x_rows: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Training-mode BatchNorm backward for (M, C) channel rows, as per-channel row sums and
    two multiply-adds (``native_batch_norm_backward`` is several times slower on channels-last
    maps). Writes the input gradient into ``out``, which must alias neither input; returns it
    and the gradients wrt weight and bias."""
    count = grad_rows.shape[0]
    grad_bias = _channel_sums(grad_rows)
    grad_weight = _channel_sums(torch.sub(x_rows, mean, out=out).mul_(grad_rows)) * rstd
    # grad_x = w rstd (g - mean(g) - xhat mean(g xhat)) = A g + B x + C per channel
    a = weight.double() * rstd.double()
    b = -a * rstd.double() * grad_weight.double() / count
    c = -a * grad_bias.double() / count - b * mean.double()
    dtype = grad_rows.dtype
    torch.addcmul(c.to(dtype), x_rows, b.to(dtype), out=out).addcmul_(grad_rows, a.to(dtype))
    return out, grad_weight, grad_bias


class _Workspace(threading.local):
    """Scratch tensors that the fused refiner reuses from block to block and step to step.

    On CPU a fresh tensor can cost more than the arithmetic on it: glibc hands large blocks
    back to the kernel on free, so every new 3H-channel map (45 MB for S at 224 px, batch 8)
    is page-faulted and zeroed again. The temporaries (the two activations, which backward
    recomputes, and the gradient maps) live here instead; nothing saved for backward or
    returned is ever a workspace view. One set per thread, device and dtype, grown to the
    largest shape seen.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.device, torch.dtype, bool], torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        # tensors made under inference_mode cannot be written outside it: a set per mode
        key = (name, like.device, like.dtype, torch.is_inference_mode_enabled())
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(*shape)


_WORKSPACE = _Workspace()


def _centred_with_ones(maps: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B, H + 1, P): the (B, H, P) maps minus their per-head ``mean``, and a row of ones, in
    the workspace. A GEMM with it applies a weight and adds a bias in one pass."""
    batch, heads, pixels = maps.shape
    augmented = _WORKSPACE.get("centred", (batch, heads + 1, pixels), maps)
    torch.sub(maps, mean.to(maps.dtype).view(1, -1, 1), out=augmented[:, :heads])
    augmented[:, heads].fill_(1.0)
    return augmented


def _map_moments(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head mean and H x H covariance of (B, H, P) maps, both float64, and the maps
    centred with a row of ones (``_centred_with_ones``)."""
    count = maps.shape[0] * maps.shape[2]
    mean = maps.sum((0, 2)).double() / count
    augmented = _centred_with_ones(maps, mean)
    centred = augmented[:, : maps.shape[1]]
    cov = torch.matmul(centred, centred.transpose(1, 2)).sum(0, dtype=torch.float64) / count
    return mean, cov, augmented


def _expand_relu6(
    augmented: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """ReLU6(weight @ centred + bias) of ``_centred_with_ones`` maps, written channels-last
    (B*P, 3H) into the workspace: the bias rides in the GEMM as the ones row's weight."""
    batch, _, pixels = augmented.shape
    weight = torch.cat([weight, bias.view(-1, 1)], 1).to(augmented.dtype)
    act1 = _WORKSPACE.get("act1", (batch, pixels, weight.shape[0]), augmented)
    torch.bmm(augmented.transpose(1, 2), weight.t().expand(batch, -1, -1), out=act1)
    return act1.clamp_(0.0, 6.0)


class _FusedTrainRefine(torch.autograd.Function):
    """Training-mode ``post_bn(refiner(A)) * scale`` with a hand-written backward.

    The 3H-channel maps live channels-last (B, N, N, 3H) from creation on: the 1x1 convs are
    batched GEMMs over the heads that read and write the NCHW H-channel maps directly, and the
    depthwise conv needs no padded copy. The expand BatchNorm's statistics come from the
    map's H x H channel covariance, so the expanded maps are normalised by the GEMM that
    creates them and never exist unnormalised (the GEMM reads the centred maps with a row
    of ones, so BN1's shift rides in it too); its backward, too, needs only H x H and
    3H x H products. The H-channel BatchNorms run as ``torch.native_batch_norm`` on NCHW,
    exactly as the modules do. Saved for backward: the map, the depthwise output and two
    H-channel maps (the modules save seven tensors); the two activations are recomputed in
    backward, into the workspace.
    """

    @staticmethod
    def forward(ctx, attn, scale, padding, bns, w1, g1, b1, w2, g2, b2, w3, g3, b3, g4, b4):
        batch, heads, rows, cols = attn.shape
        hidden, pixels = w1.shape[0], rows * cols
        count = batch * pixels
        maps = attn.reshape(batch, heads, pixels)
        # expand + BN1: mean_e = W mean(A), var_e = diag(W Cov(A) W^T)
        mean_a, cov, centred = _map_moments(maps)
        w1m = w1.view(hidden, heads).double()
        mean1 = w1m @ mean_a
        var1 = ((w1m @ cov) * w1m).sum(1).clamp_(min=0)
        rstd1 = torch.rsqrt(var1 + bns[0].eps)
        alpha1 = g1.double() * rstd1
        # on the centred maps BN1 is W1 * alpha1 and the bias b1
        w1_folded = (w1m * alpha1.view(-1, 1)).to(attn.dtype)
        act1 = _expand_relu6(centred, w1_folded, b1)
        act1 = act1.view(batch, rows, cols, hidden).permute(0, 3, 1, 2)
        # depthwise conv + BN2 + ReLU6, channels-last. The statistics are row sums of the
        # (B*N*N, 3H) view, which PyTorch reduces much faster than var_mean over NCHW dims;
        # the centred squares are written where act2 goes next.
        local = F.conv2d(act1, w2, padding=padding, groups=hidden)
        local_rows = _channel_rows(local)
        act2_rows = _WORKSPACE.get("act2", local_rows.shape, local)
        mean2 = _channel_sums(local_rows) / count
        var2 = _channel_sums(torch.sub(local_rows, mean2, out=act2_rows).square_()) / count
        rstd2 = torch.rsqrt(var2.double() + bns[1].eps)
        alpha2 = g2.double() * rstd2
        shift2 = b2.double() - mean2.double() * alpha2
        alpha2, shift2 = alpha2.to(local.dtype), shift2.to(local.dtype)
        torch.addcmul(shift2, local_rows, alpha2, out=act2_rows).clamp_(0.0, 6.0)
        # reduce conv back to NCHW, BN3, residual, post BN, scale: as the modules compute them
        act2_rows = act2_rows.view(batch, pixels, hidden)
        reduced = torch.matmul(w3.view(heads, hidden), act2_rows.transpose(1, 2))
        reduced = reduced.view(batch, heads, rows, cols)
        bn3, bn4 = bns[2], bns[3]
        summed, mean3, rstd3 = torch.native_batch_norm(
            reduced, g3, b3, bn3.running_mean, bn3.running_var, True, _batchnorm_momentum(bn3),
            bn3.eps,
        )  # fmt: skip
        summed.add_(attn)
        out, mean4, rstd4 = torch.native_batch_norm(
            summed, g4, b4, bn4.running_mean, bn4.running_var, True, _batchnorm_momentum(bn4),
            bn4.eps,
        )  # fmt: skip
        out.mul_(scale)
        _update_running_stats(bns[0], mean1, var1, count)
        _update_running_stats(bns[1], mean2.double(), var2.double(), count)
        ctx.save_for_backward(attn, local, reduced, summed, w1, w2, w3, g2, g3, g4)
        ctx.stats = (mean_a, rstd1, alpha1, mean2, rstd2, mean3, rstd3, mean4, rstd4, cov)
        ctx.folded = (w1_folded, b1.detach().clone(), alpha2, shift2)
        ctx.scale, ctx.padding, ctx.eps = scale, padding, [bn.eps for bn in bns]
        return out

    @staticmethod
    def backward(ctx, grad):
        attn, local, reduced, summed, w1, w2, w3, g2, g3, g4 = ctx.saved_tensors
        w1_folded, b1, alpha2, shift2 = ctx.folded
        dtype = attn.dtype
        mean_a, rstd1, alpha1, mean2, rstd2, mean3, rstd3, mean4, rstd4, cov = (
            t.to(dtype) for t in ctx.stats
        )
        batch, heads, rows, cols = attn.shape
        hidden, pixels = w1.shape[0], rows * cols
        count = batch * pixels
        bn_backward = torch.ops.aten.native_batch_norm_backward
        eps = ctx.eps
        g_summed, g_g4, g_b4 = bn_backward(
            grad.contiguous() * ctx.scale, summed, g4, None, None, mean4, rstd4, True, eps[3],
            [True, True, True],
        )  # fmt: skip
        g_reduced, g_g3, g_b3 = bn_backward(
            g_summed, reduced, g3, None, None, mean3, rstd3, True, eps[2], [True, True, True]
        )
        g_reduced = g_reduced.reshape(batch, heads, pixels)
        # reduce conv and BN2 + ReLU6, with act2 recomputed from the depthwise output
        local_rows = _channel_rows(local)
        act2_rows = _WORKSPACE.get("act2", local_rows.shape, local)
        torch.addcmul(shift2, local_rows, alpha2, out=act2_rows).clamp_(0.0, 6.0)
        g_w3 = torch.matmul(g_reduced, act2_rows.view(batch, pixels, hidden)).sum(0)
        g_act2 = _WORKSPACE.get("grad", (batch, pixels, hidden), local)
        torch.bmm(
            g_reduced.transpose(1, 2), w3.view(1, heads, hidden).expand(batch, -1, -1), out=g_act2
        )
        g_act2 = g_act2.view(count, hidden)
        torch.ops.aten.hardtanh_backward.grad_input(g_act2, act2_rows, 0.0, 6.0, grad_input=g_act2)
        # act2 is spent: its storage takes the depthwise output's gradient
        g_local, g_g2, g_b2 = _bn_backward_rows(g_act2, local_rows, g2, mean2, rstd2, act2_rows)
        g_local = g_local.view(batch, rows, cols, hidden).permute(0, 3, 1, 2)
        # depthwise conv and BN1 + ReLU6, with act1 recomputed from the map
        augmented = _centred_with_ones(attn.reshape(batch, heads, pixels), mean_a)
        act1 = _expand_relu6(augmented, w1_folded, b1)
        act1 = act1.view(batch, rows, cols, hidden).permute(0, 3, 1, 2)
        g_act1, g_w2, _ = torch.ops.aten.convolution_backward(
            g_local, act1, w2, None, [1, 1], ctx.padding, [1, 1], False, [0, 0], hidden,
            [True, True, False],
        )  # fmt: skip
        del g_local
        torch.ops.aten.hardtanh_backward.grad_input(g_act1, act1, 0.0, 6.0, grad_input=g_act1)
        # expand + BN1 from (3H, H) products: with g the pre-activation gradient and Ac the
        # centred map, xhat = rstd W Ac, so sum(g * xhat) = rstd * rowsum(W * (g Ac^T)) and
        # the gradients wrt A and W are small matrices applied to g and Ac.
        g_pre = g_act1.permute(0, 2, 3, 1).reshape(batch, pixels, hidden)
        centred = augmented[:, :heads]
        w1m = w1.view(hidden, heads)
        g_centred = torch.matmul(centred, g_pre).sum(0).t()  # (3H, H)
        g_b1 = _channel_sums(g_pre.view(-1, hidden))
        g_g1 = (w1m * g_centred).sum(1) * rstd1
        xhat_coef = alpha1 * g_g1 * rstd1 / count
        g_w1 = alpha1.view(-1, 1) * g_centred - xhat_coef.view(-1, 1) * (w1m @ cov * count)
        # g_attn = (alpha W)^T g - (W^T diag(c) W) Ac - const + g_summed, accumulated in place
        g_attn = torch.sub(
            g_summed.view(batch, heads, pixels),
            ((alpha1 * g_b1 / count) @ w1m).view(1, -1, 1),
        )
        g_attn.baddbmm_((alpha1.view(-1, 1) * w1m).t().expand(batch, -1, -1), g_pre.transpose(1, 2))
        g_attn.baddbmm_(((w1m.t() * xhat_coef) @ w1m).expand(batch, -1, -1), centred, alpha=-1)
        g_attn = g_attn.view_as(attn)
        return (
            g_attn, None, None, None, g_w1.view_as(w1), g_g1, g_b1, g_w2, g_g2, g_b2,
            g_w3.view_as(w3), g_g3, g_b3, g_g4, g_b4,
        )  # fmt: skip


class RefinerAttention(nn.Module):
    """Multi-head attention of one block kind; returns the output and the map it hands on."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_type: str,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        refiner_expansion: int = 3,
        refiner_kernel_size: int = 3,
        attn_map_residual: bool = True,
        refiner_channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.block_type = block_type
        self.attn_map_residual = attn_map_residual
        self.refiner_checkpointing = False
        if block_type == "shared":
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if block_type in ("refine", "shared"):
            self.refiner = AttentionRefiner(
                num_heads, refiner_expansion, refiner_kernel_size, refiner_channels_last
            )
            self.adapt_bn = nn.BatchNorm2d(num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def refine(self, attn: torch.Tensor) -> torch.Tensor:
        if not self.training and self._foldable():
            return self.refiner.forward_folded(attn, self.adapt_bn, self.scale)
        refine = self._refine_fused if self._fusable(attn) else self._refine_modules
        if self.refiner_checkpointing and torch.is_grad_enabled():
            # Keep only the map for backward, not the 3x wider expanded maps: recomputed.
            return checkpoint_keeping_bn_stats(self, refine, attn)
        return refine(attn)

    def _norms(self) -> tuple[nn.Module, ...]:
        refiner = self.refiner
        return refiner.expand_bn, refiner.local_bn, refiner.reduce_bn, self.adapt_bn

    def _fusable(self, attn: torch.Tensor) -> bool:
        """Whether training may use the fused refiner: it reads the BatchNorms' tensors and
        updates their running statistics itself, so each must be a plain training-mode
        ``nn.BatchNorm2d`` (SyncBatchNorm and FSDP-wrapped norms run as modules). Under
        autocast or torch.compile the modules run too: the compiler fuses them itself. It is
        written for (and tested on) the CPU, where the refiner is memory-bound."""
        return (
            attn.device.type == "cpu"
            and attn.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(attn.device.type)
            and not torch.compiler.is_compiling()
            and all(
                type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
                for bn in self._norms()
            )
        )

    def _refine_fused(self, attn: torch.Tensor) -> torch.Tensor:
        refiner, norms = self.refiner, self._norms()
        weights = [refiner.expand.weight, refiner.local.weight, refiner.reduce.weight]
        return _FusedTrainRefine.apply(
            attn.contiguous(), self.scale, list(refiner.local.padding), norms,
            weights[0], norms[0].weight, norms[0].bias, weights[1], norms[1].weight,
            norms[1].bias, weights[2], norms[2].weight, norms[2].bias, norms[3].weight,
            norms[3].bias,
        )  # fmt: skip

    def _foldable(self) -> bool:
        """Whether eval may fold the BatchNorms: folding reads their tensors directly, so each
        must be an unwrapped BatchNorm (SyncBatchNorm included) with running statistics. FSDP
        under mixed precision wraps every BatchNorm in its own unit, whose parameters are only
        gathered while that module runs: then the modules run instead (the same function)."""
        return all(
            isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
            for bn in self._norms()
        )

    def _refine_modules(self, attn: torch.Tensor) -> torch.Tensor:
        return self.adapt_bn(self.refiner(attn)) * self.scale

    def forward(
        self,
        x: torch.Tensor,
        prev_map: torch.Tensor | None,
        need_map: bool = True,
        maps_out: list[AttentionMaps] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = x.shape
        if self.block_type == "shared":
            if prev_map is None:
                raise RuntimeError("a 'shared' block needs the attention map of the block before")
            v = self._heads(self.v(x))
            attn = self.refine(prev_map)
            next_map = prev_map  # the unrefined map goes on
            if maps_out is not None:
                maps_out.append(AttentionMaps(prev_map, attn))
        else:
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, dim).permute(2, 0, 1, 3)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            add_prev = self.attn_map_residual and prev_map is not None
            if self.block_type == "plain" and not (need_map or add_prev or maps_out is not None):
                # Nobody reads this map: the fused kernel never materialises it.
                drop = self.attn_drop.p if self.training else 0.0
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
                return self.proj_drop(
                    self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
                ), None
            # scaling q costs a twelfth of scaling the N x N map
            attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
            if add_prev and attn.requires_grad:  # softmax's backward needs its output
                attn = torch.add(attn, prev_map, alpha=self.scale)
            elif add_prev:
                attn.add_(prev_map, alpha=self.scale)
            attn = self.attn_drop(attn)
            next_map = attn
            if self.block_type == "refine":
                attn = self.refine(attn)
            if maps_out is not None:
                maps_out.append(
                    AttentionMaps(next_map, attn if self.block_type == "refine" else None)
                )
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out)), next_map


class RefinerBlock(nn.Module):
    """x + 2 * attn(LN(x / 2)), then x + 2 * gamma * MLP(LN(x / 2)), as released."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_type: str,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float = 1e-5,
        refiner_expansion: int = 3,
        refiner_kernel_size: int = 3,
        attn_map_residual: bool = True,
        refiner_channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.block_type = block_type
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(
            dim,
            num_heads,
            block_type,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            refiner_expansion=refiner_expansion,
            refiner_kernel_size=refiner_kernel_size,
            attn_map_residual=attn_map_residual,
            refiner_channels_last=refiner_channels_last,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        # The release multiplies the MLP output by gamma before its last dropout; an
        # elementwise scale commutes with dropout, so timm's LayerScale after Mlp is the same.
        self.ls2 = LayerScale(dim, init_values=init_values)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        prev_map: torch.Tensor | None,
        need_map: bool = True,
        maps_out: list[AttentionMaps] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, next_map = self.attn(_scaled_layer_norm(self.norm1, x), prev_map, need_map, maps_out)
        x = torch.add(x, self.drop_path1(y), alpha=1 / RESIDUAL_SCALE)
        y = self.drop_path2(self.ls2(self.mlp(_scaled_layer_norm(self.norm2, x))))
        return torch.add(x, y, alpha=1 / RESIDUAL_SCALE), next_map


def _scaled_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x * RESIDUAL_SCALE)`` without the scaled copy: LayerNorm(c x, eps) equals
    LayerNorm(x, eps / c^2)."""
    return F.layer_norm(
        x, norm.normalized_shape, norm.weight, norm.bias, norm.eps / RESIDUAL_SCALE**2
    )


def _freeze_batchnorm_stats(module: nn.Module) -> list[tuple[nn.modules.batchnorm._BatchNorm, Any]]:
    """Set momentum 0 on every BatchNorm, so a recomputed forward leaves running stats alone."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    return saved


def checkpoint_keeping_bn_stats(module: nn.Module, fn, *args):
    """``torch.utils.checkpoint`` of ``fn(*args)`` that keeps BatchNorm running stats exact.

    The backward pass re-runs ``fn``; the BatchNorms inside ``module`` would then update their
    running statistics twice per step. The first call updates them, the recomputation does not.
    """
    calls = 0

    def run(*args_):
        nonlocal calls
        calls += 1
        if calls == 1 or not module.training:
            return fn(*args_)
        saved = _freeze_batchnorm_stats(module)
        try:
            return fn(*args_)
        finally:
            for bn, momentum, tracked in saved:
                bn.momentum = momentum
                bn.num_batches_tracked.copy_(tracked)

    return checkpoint(run, *args, use_reentrant=False)


class RefinerViT(nn.Module):
    """Refiner-ViT. Defaults are Refiner-ViT-S as released.

    ``forward(x)`` returns class logits ``cls + 0.5 * max_tokens(aux)`` (only ``cls`` without
    a token head) in train and eval mode alike; ``forward_train`` gives the token-labelling
    output with MixToken; ``forward_cls`` gives class-token logits alone.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        block_types: Sequence[str] | None = None,
        refiner: bool = True,
        refiner_expansion: int = 3,
        refiner_kernel_size: int = 3,
        attn_map_residual: bool | None = None,
        refiner_channels_last: bool = False,
        stem: Literal["conv", "linear"] = "conv",
        token_head: bool = True,
        aux_weight: float = 0.5,
        init_values: float = 1e-5,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mix_token: bool = True,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        self._check_args(img_size, patch_size, embed_dim, num_heads, stem, refiner_kernel_size)
        block_types = self._resolve_block_types(block_types, depth, refiner)
        if attn_map_residual is None:
            attn_map_residual = refiner  # the plain-ViT baseline keeps blocks independent
        if global_pool != "token":
            raise UserInputError(
                f"global_pool={global_pool!r} is not supported: Refiner-ViT classifies from "
                "the class token; use global_pool='token'"
            )
        self.model_args: dict[str, Any] = {
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "num_classes": num_classes,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "block_types": list(block_types),
            "refiner_expansion": refiner_expansion,
            "refiner_kernel_size": refiner_kernel_size,
            "attn_map_residual": attn_map_residual,
            "stem": stem,
            "token_head": token_head,
            "aux_weight": aux_weight,
            "init_values": init_values,
        }
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.aux_weight = aux_weight
        self.mix_token = mix_token
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.block_types = list(block_types)

        stem_cls = ConvStem if stem == "conv" else LinearPatchEmbed
        self.patch_embed = stem_cls(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            RefinerBlock(
                embed_dim,
                num_heads,
                kind,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                init_values=init_values,
                refiner_expansion=refiner_expansion,
                refiner_kernel_size=refiner_kernel_size,
                attn_map_residual=attn_map_residual,
                refiner_channels_last=refiner_channels_last,
            )
            for i, kind in enumerate(block_types)
        )
        # A block's map is needed by the next one if that one refines it or adds it.
        self._hands_on_map = [nxt == "shared" or attn_map_residual for nxt in block_types[1:]] + [
            False
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head: nn.Module | None = None
        if token_head:
            self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------- construction
    @staticmethod
    def _check_args(img_size, patch_size, embed_dim, num_heads, stem, kernel_size) -> None:
        if stem not in ("conv", "linear"):
            raise UserInputError(f"stem={stem!r} is unknown: use 'conv' or 'linear'")
        if patch_size < 1 or (stem == "conv" and patch_size % 2):
            raise UserInputError(
                f"patch_size={patch_size} does not work with the {stem} stem: the conv stem "
                "downsamples by 2 first, so use an even patch size (e.g. 16) or stem='linear'"
            )
        for side in img_size:
            if side < patch_size or side % patch_size:
                lower = max(patch_size, side // patch_size * patch_size)
                raise UserInputError(
                    f"img_size {side} is not divisible by patch_size {patch_size}: use a "
                    f"multiple of {patch_size}, e.g. {lower} or {lower + patch_size}"
                )
        if embed_dim % num_heads:
            raise UserInputError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: pick a "
                "head count that divides the width"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserInputError(
                f"refiner_kernel_size={kernel_size} must be odd so the map keeps its size: "
                "use 1, 3, 5, ..."
            )

    @staticmethod
    def _resolve_block_types(block_types, depth: int, refiner: bool) -> list[str]:
        if not refiner:
            return ["plain"] * depth
        if block_types is None:
            return ["plain" if i % 2 == 0 else "shared" for i in range(depth)]
        block_types = list(block_types)
        if len(block_types) != depth:
            raise UserInputError(
                f"block_types has {len(block_types)} entries but depth is {depth}: give one "
                "kind per block"
            )
        unknown = sorted(set(block_types) - set(BLOCK_TYPES))
        if unknown:
            raise UserInputError(
                f"unknown block types {unknown}: each entry must be one of {list(BLOCK_TYPES)}"
            )
        if block_types[0] == "shared":
            raise UserInputError(
                "block_types[0] is 'shared', but a shared block refines the map of the block "
                "before it: start with 'plain' or 'refine'"
            )
        return block_types

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # ----------------------------------------------------------------- timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_refiner_checkpointing(self, enable: bool = True) -> None:
        """Recompute the refiners' expanded maps in backward instead of storing them: a
        cheaper memory saving than whole-block checkpointing (the refiner is most of it)."""
        for block in self.blocks:
            block.attn.refiner_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "token":
            raise UserInputError("Refiner-ViT supports only global_pool='token'")
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes
        device = self.norm.weight.device
        make = lambda: nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()  # noqa: E731
        self.head = make().to(device)
        if self.aux_head is not None:
            self.aux_head = make().to(device)
        for head in (self.head, self.aux_head):
            if head is not None:
                head.apply(_init_linear_and_norm)

    # ----------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor, mix_box: tuple[int, int, int, int] | None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not split into {self.patch_size}px "
                f"patches: resize or crop to a multiple of {self.patch_size}"
            )
        x = self.patch_embed(x)  # (B, D, gh, gw)
        grid = x.shape[-2:]
        if mix_box is not None:
            top, left, bottom, right = mix_box
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos_embed = self.pos_embed
        if tuple(grid) != self.grid_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=1
            )
        return self.pos_drop(x + pos_embed)

    def _blocks(self, x: torch.Tensor, maps_out: list[AttentionMaps] | None = None) -> torch.Tensor:
        prev_map = None
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and maps_out is None
        for block, need_map in zip(self.blocks, self._hands_on_map, strict=True):
            if checkpointing:
                x, prev_map = checkpoint_keeping_bn_stats(
                    block, partial(block, need_map=need_map), x, prev_map
                )
            else:
                x, prev_map = block(x, prev_map, need_map, maps_out)
        return self.norm(x)

    def forward_features(
        self,
        x: torch.Tensor,
        mix_box: tuple[int, int, int, int] | None = None,
        maps_out: list[AttentionMaps] | None = None,
    ) -> torch.Tensor:
        """Tokens (B, 1 + G*G, D) after the final norm; ``mix_box`` applies MixToken and
        ``maps_out``, when given, collects every block's maps from this same pass."""
        return self._blocks(self._embed(x, mix_box), maps_out)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, cls_only: bool = False
    ) -> torch.Tensor:
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        logits = self.head(cls)
        if self.aux_head is None or cls_only:
            return logits
        aux = self.aux_head(x[:, self.num_prefix_tokens :])
        return logits + self.aux_weight * aux.max(dim=1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token logits alone, without the token head."""
        return self.forward_head(self.forward_features(x), cls_only=True)

    def forward_attention_maps(self, x: torch.Tensor) -> list[AttentionMaps]:
        """Every block's raw and refined maps for input ``x``; the forward is unchanged."""
        maps: list[AttentionMaps] = []
        self._blocks(self._embed(x, None), maps_out=maps)
        return maps

    def sample_mix_box(self, grid: Sequence[int]) -> tuple[tuple[int, int, int, int], float]:
        """MixToken box on a (gh, gw) grid: lam ~ Beta(1, 1), sides sqrt(1 - lam) of the grid,
        uniform centre, clipped. Returns the box and the kept share lam' = 1 - area / (gh*gw)."""
        gh, gw = grid
        lam = torch.rand(()).item()  # Beta(1, 1) is uniform
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(gh * cut), int(gw * cut)
        cy, cx = torch.randint(gh, ()).item(), torch.randint(gw, ()).item()
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, gh)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, gw)
        kept = 1.0 - (bottom - top) * (right - left) / (gh * gw)
        return (top, left, bottom, right), kept

    def forward_train(
        self,
        x: torch.Tensor,
        mix_token: bool | None = None,
        maps_out: list[AttentionMaps] | None = None,
    ) -> TokenLabelOutput:
        """Token-labelling output: class logits, per-patch logits (B, G*G, C), MixToken box.

        MixToken (default: the model's ``mix_token``) only ever applies in training mode. The
        patch logits inside the box are swapped back, so each lines up with its own image.
        """
        if self.aux_head is None:
            raise UserInputError(
                "forward_train needs the token head: build the model with token_head=True"
            )
        mix_token = self.mix_token if mix_token is None else mix_token
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        box, lam = None, 1.0
        if mix_token and self.training:
            box, lam = self.sample_mix_box(grid)
        tokens = self.forward_features(x, box, maps_out)
        cls_logits = self.head(self.head_drop(tokens[:, 0]))
        aux_logits = self.aux_head(tokens[:, self.num_prefix_tokens :])
        if box is not None:
            top, left, bottom, right = box
            aux = aux_logits.reshape(x.shape[0], grid[0], grid[1], -1).clone()
            aux[:, top:bottom, left:right] = aux.flip(0)[:, top:bottom, left:right]
            aux_logits = aux.reshape(x.shape[0], grid[0] * grid[1], -1)
        return TokenLabelOutput(cls_logits, aux_logits, box, lam)

    # ----------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained on another grid (e.g. 224 -> 448 fine-tuning) gets its position
        # embedding resampled, never silently re-initialised.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resample_pos_embed(state_dict[key], self.grid_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Bicubically resample a (1, 1 + g*g, D) position embedding to ``grid_size``.

    The stored grid is taken as square (all released and preset grids are).
    """
    old_tokens = pos_embed.shape[1] - 1
    old = int(math.isqrt(old_tokens))
    if old * old != old_tokens:
        raise UserInputError(
            f"pos_embed has {old_tokens} patch tokens, which is not a square grid: this "
            "checkpoint was not trained on square images and cannot be resampled automatically"
        )
    if [old, old] == list(grid_size):
        return pos_embed
    _logger.info("Resampling pos_embed from a %dx%d grid to %s", old, old, tuple(grid_size))
    return resample_abs_pos_embed(
        pos_embed.float(), list(grid_size), [old, old], num_prefix_tokens=1
    ).to(pos_embed.dtype)


# ----------------------------------------------------------------- release conversion
_RELEASE_RENAMES = (
    (".attn.DLA.conv_exp.", ".attn.refiner.expand."),
    (".attn.DLA.bn1.", ".attn.refiner.expand_bn."),
    (".attn.DLA.depth_sep_conv.", ".attn.refiner.local."),
    (".attn.DLA.bn2.", ".attn.refiner.local_bn."),
    (".attn.DLA.conv_pro.", ".attn.refiner.reduce."),
    (".attn.DLA.bn3.", ".attn.refiner.reduce_bn."),
    (".mlp.scale_channel", ".ls2.gamma"),
)


def release_to_refiner_pl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the release's keys to ours; a state dict already in our naming passes through.

    A shared block's value projection is stored as ``attn.qkv`` with a (D, D) weight in the
    release; it becomes ``attn.v``.
    """
    out = {}
    width = state_dict["cls_token"].shape[-1] if "cls_token" in state_dict else None
    for key, value in state_dict.items():
        new = key
        for old, replacement in _RELEASE_RENAMES:
            new = new.replace(old, replacement)
        if ".attn.qkv." in new and new.endswith((".weight", ".bias")) and value.shape[0] == width:
            new = new.replace(".attn.qkv.", ".attn.v.")
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, Any], model: RefinerViT) -> dict[str, Any]:
    """timm's hook for foreign checkpoints: unwrap, rename release keys, fit pos_embed."""
    from refiner_pl.models.checkpoint import unwrap_state_dict

    state_dict = release_to_refiner_pl(unwrap_state_dict(state_dict))
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], model.grid_size)
    return state_dict


# ----------------------------------------------------------------- presets
def _cfg(crop_pct: float, input_size: int = 224, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, input_size, input_size),
        "pool_size": None,
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.conv1",
        "classifier": ("head", "aux_head"),
        "license": "apache-2.0",
        **kwargs,
    }


# The release's weights are not on any hub: load a downloaded file with
# `from_official_checkpoint(path)` or `pretrained=True, pretrained_cfg_overlay={"file": path}`.
default_cfgs = generate_default_cfgs(
    {
        "refiner_vit_tiny.untrained": _cfg(
            crop_pct=1.0, input_size=32, num_classes=10, first_conv="patch_embed.conv1"
        ),
        "refiner_vit_s.release_in1k": _cfg(crop_pct=0.9),
        "refiner_vit_m.release_in1k": _cfg(crop_pct=1.0),
        "refiner_vit_l.release_in1k": _cfg(crop_pct=1.13),
        "refiner_vit_l.release_in1k_448": _cfg(crop_pct=1.13, input_size=448),
    }
)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU quickstart size: 32 px digits/CIFAR, 8x8 patch grid.
    "refiner_vit_tiny": dict(
        img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10
    ),
    "refiner_vit_s": dict(embed_dim=384, depth=16, num_heads=12, mlp_ratio=3.0),
    "refiner_vit_m": dict(embed_dim=420, depth=32, num_heads=12, mlp_ratio=3.0),
    "refiner_vit_l": dict(embed_dim=512, depth=32, num_heads=16, mlp_ratio=3.0),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> RefinerViT:
    return build_model_with_cfg(
        RefinerViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**PRESETS[variant], **kwargs},
    )


@register_model
def refiner_vit_tiny(pretrained: bool = False, **kwargs: Any) -> RefinerViT:
    """A 4-block Refiner-ViT (width 64) for CPU quickstarts on 32 px images."""
    return _create("refiner_vit_tiny", pretrained, **kwargs)


@register_model
def refiner_vit_s(pretrained: bool = False, **kwargs: Any) -> RefinerViT:
    """Refiner-ViT-S: 16 blocks, width 384, 12 heads (83.6% ImageNet top-1 at 224)."""
    return _create("refiner_vit_s", pretrained, **kwargs)


@register_model
def refiner_vit_m(pretrained: bool = False, **kwargs: Any) -> RefinerViT:
    """Refiner-ViT-M: 32 blocks, width 420, 12 heads (84.6% at 224)."""
    return _create("refiner_vit_m", pretrained, **kwargs)


@register_model
def refiner_vit_l(pretrained: bool = False, **kwargs: Any) -> RefinerViT:
    """Refiner-ViT-L: 32 blocks, width 512, 16 heads (84.9% at 224, 86.0% at 448)."""
    return _create("refiner_vit_l", pretrained, **kwargs)

"""CPU speed kernels for Refiner-ViT, behind one switch.

``refiner_vit.py`` holds the plain modules and is the reference; the functions here compute
the same things faster and are used where they apply. Each entry point returns ``None`` when
it does not apply, and the model then runs its modules:

- :func:`refine`: the refiner and its post BatchNorm. In training (CPU, fp32/fp64, plain
  ``nn.BatchNorm2d``) one autograd function with a hand-written backward; in eval, the five
  BatchNorms folded into the three convolutions, run a few samples at a time on CPU.
- :func:`conv_stem`: in eval, the stem's BatchNorms folded into its convolutions
  (channels-last on CPU); the patch projection as one GEMM.
- :func:`patch_projection`: a k x k stride-k convolution as one GEMM over cut-out patches.

Everything steps aside under torch.fx symbolic tracing (the model's modules are what a graph
should contain); the model skips it under TorchScript. ``set_fast_refiner(False)`` or the
environment variable ``REFINER_FAST=0`` turns it all off, as timm's ``set_fused_attn`` does
for fused attention. See ``docs/architecture.md`` for the computation and the measurements.
"""

import math
import os
import threading
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "CHUNK_BYTES",
    "conv_stem",
    "patch_projection",
    "refine",
    "refine_path",
    "set_fast_refiner",
    "use_fast_refiner",
]

_USE_FAST = os.environ.get("REFINER_FAST", "1").strip().lower() not in ("0", "false", "no", "off")

CHUNK_BYTES = 8 * 2**20  # per expanded map of an eval chunk: one or two samples at 224 px

RefinePath = Literal["fused", "folded", "modules"]


def set_fast_refiner(enable: bool = True) -> None:
    """Use the fast kernels where they apply (default), or always the plain modules."""
    global _USE_FAST
    _USE_FAST = bool(enable)


def use_fast_refiner() -> bool:
    """Whether the fast kernels are switched on (``REFINER_FAST=0`` starts with them off)."""
    return _USE_FAST


def _off_for(x: torch.Tensor) -> bool:
    # A symbolic trace must record the modules: the kernels branch on shapes and devices.
    return not _USE_FAST or isinstance(x, torch.fx.Proxy)


# ----------------------------------------------------------------- dispatch
def _norms(attention: nn.Module) -> tuple[nn.Module, ...]:
    refiner = attention.refiner
    return refiner.expand_bn, refiner.local_bn, refiner.reduce_bn, attention.adapt_bn


def refine_path(attention: nn.Module, attn: torch.Tensor) -> RefinePath:
    """Which computation :func:`refine` picks for a refining attention layer and map.

    ``folded`` in eval when every BatchNorm (SyncBatchNorm included) has running statistics:
    folding reads their tensors, so FSDP-wrapped norms, whose parameters are only gathered
    while they run, leave the modules in place. ``fused`` in training on CPU, fp32/fp64,
    outside autocast and torch.compile, when each norm is a plain training-mode, affine
    ``nn.BatchNorm2d`` with running statistics: the fused function reads their tensors and
    updates their statistics itself. ``modules`` otherwise.
    """
    if _off_for(attn):
        return "modules"
    norms = _norms(attention)
    if not attention.training:
        foldable = all(isinstance(bn, _BatchNorm) and bn.track_running_stats for bn in norms)
        return "folded" if foldable else "modules"
    fusable = (
        attn.device.type == "cpu"
        and attn.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(attn.device.type)
        and not torch.compiler.is_compiling()
        and all(
            type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            for bn in norms
        )
    )
    return "fused" if fusable else "modules"


def refine(attention: nn.Module, attn: torch.Tensor) -> torch.Tensor | None:
    """``attention.adapt_bn(attention.refiner(attn)) * attention.scale`` by a fast path, or
    ``None`` where none applies."""
    path = refine_path(attention, attn)
    refiner, scale = attention.refiner, attention.scale
    if path == "folded":
        return _folded_refine(refiner, attention.adapt_bn, scale, attn)
    if path == "fused":
        norms = _norms(attention)
        return _FusedTrainRefine.apply(
            attn.contiguous(), scale, list(refiner.local.padding), norms,
            refiner.expand.weight, norms[0].weight, norms[0].bias, refiner.local.weight,
            norms[1].weight, norms[1].bias, refiner.reduce.weight, norms[2].weight,
            norms[2].bias, norms[3].weight, norms[3].bias,
        )  # fmt: skip
    return None


def conv_stem(stem: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The release's conv stem (``conv1..3``/``bn1..3``, ``act``, ``proj``) with eval-mode
    BatchNorms folded into the convolutions and the projection as a GEMM; ``None`` when off."""
    if _off_for(x):
        return None
    if x.device.type == "cpu" and not stem.bn1.training:
        # oneDNN's convolutions are ~20% faster channels-last. Not in training: PyTorch's
        # channels-last BatchNorm statistics differ from the release's by ~1e-5 there.
        x = x.contiguous(memory_format=torch.channels_last)
    for conv, bn in ((stem.conv1, stem.bn1), (stem.conv2, stem.bn2), (stem.conv3, stem.bn3)):
        if bn.training or not _whole_batchnorm(bn):
            x = stem.act(bn(conv(x)))
        else:  # running statistics: fold the BatchNorm into the convolution
            weight, bias = _fold_bn(conv.weight, bn)
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding).relu_()
    out = patch_projection(stem.proj, x)
    return stem.proj(x) if out is None else out


def patch_projection(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """A k x k convolution with stride k as one GEMM over the cut-out patches, returned
    channels-last; ``None`` off the CPU or when k does not divide the input. oneDNN runs this
    shape far below its GEMM speed, above all in backward (about 4x); cuDNN does well."""
    if _off_for(x):
        return None
    kernel = conv.kernel_size[0]
    batch, chans, height, width = x.shape
    if x.device.type != "cpu" or height % kernel or width % kernel:
        return None
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


# ----------------------------------------------------------------- BatchNorm folding
def _whole_batchnorm(bn: nn.Module) -> bool:
    """Whether ``bn`` holds all of its tensors here (FSDP leaves a shard of 0 elements outside
    its unit's forward), with running statistics: only then may it be folded."""
    return bn.track_running_stats and all(
        t is None or t.numel() == bn.num_features
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    )


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift under running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _fold_bn(weight: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _bn_affine(bn)
    return weight * scale.view(-1, 1, 1, 1), shift


# ----------------------------------------------------------------- eval: folded, chunked
def _folded_refine(
    refiner: nn.Module, post_bn: nn.Module, post_scale: float, attn: torch.Tensor
) -> torch.Tensor:
    """``post_bn(refiner(attn)) * post_scale`` with every BatchNorm folded into the convs:
    three convs and one fused multiply-add instead of three convs, five normalisations and
    a multiply. Only valid under running statistics (eval mode)."""
    w1, b1 = _fold_bn(refiner.expand.weight, refiner.expand_bn)
    w2, b2 = _fold_bn(refiner.local.weight, refiner.local_bn)
    w3, b3 = _fold_bn(refiner.reduce.weight, refiner.reduce_bn)
    post_w, post_b = _bn_affine(post_bn)
    post_w, post_b = post_w * post_scale, post_b * post_scale
    # post(R + A) = R * w + b + A * w, and R's conv absorbs w and b
    w3 = w3 * post_w.view(-1, 1, 1, 1)
    b3 = b3 * post_w + post_b
    local = (refiner.local.padding, refiner.local.groups)
    # out = A * w + b3 + W3 act2, the 1x1 reduce conv a GEMM accumulating into it. On CPU
    # a few samples at a time, so the 3H-channel maps of a chunk stay in cache.
    batch, heads = attn.shape[:2]
    maps = attn.reshape(batch, heads, -1)
    chunk = _chunk_size(attn, w1.shape[0])
    if chunk is None or torch.is_grad_enabled():
        # tracing, exporting, compiling, on a GPU or differentiating: one batch-wide pass
        out = torch.addcmul(b3.view(-1, 1), maps, post_w.view(-1, 1))
        # out of place: under autocast the GEMM's dtype may differ from out's
        operands = _folded_reduce_operands(attn, w1, b1, w2, b2, w3, local)
        return torch.baddbmm(out, *operands).view_as(attn)
    out = torch.empty_like(maps)
    for start in range(0, batch, chunk):
        part, target = attn[start : start + chunk], out[start : start + chunk]
        torch.addcmul(b3.view(-1, 1), maps[start : start + chunk], post_w.view(-1, 1), out=target)
        target.baddbmm_(*_folded_reduce_operands(part, w1, b1, w2, b2, w3, local, _WORKSPACE))
    return out.view_as(attn)


def _folded_reduce_operands(
    attn: torch.Tensor, w1, b1, w2, b2, w3, local: tuple, workspace: "_Workspace | None" = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W3, act2) for one batched GEMM: the folded expand, depthwise conv and ReLU6s."""
    padding, groups = local
    act1 = _expand_channels_last(attn, w1, b1, workspace).clamp_(0.0, 6.0)
    act2 = _channel_rows(F.conv2d(act1, w2, padding=padding, groups=groups))
    act2 = act2.add_(b2).clamp_(0.0, 6.0)
    act2 = act2.view(attn.shape[0], -1, act2.shape[1]).transpose(1, 2)
    return w3.view(1, w3.shape[0], -1).expand(attn.shape[0], -1, -1), act2


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
    workspace: "_Workspace | None" = None,
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


# ----------------------------------------------------------------- training: fused
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

"""Refiner-ViT ("Refiner: Refining Self-attention for Vision Transformers", Zhou et al. 2021).

The reference implementation, in the style of timm's ``vision_transformer.py``: layers, block,
model, the release-checkpoint filter and the registered presets. It computes what the released
models compute (``docs/architecture.md`` describes it); the options beyond the release (block
kinds, expansion, kernel size, stem, token head, refiner off) serve the ablations. Faster CPU
versions of the refiner and the stem live in ``fast_refiner.py``, behind one switch.

Block kinds, chosen per block with ``block_types``:

``plain``   softmax attention; adds ``scale * previous map`` when ``attn_map_residual``.
``refine``  like ``plain``, then refines its own fresh map before using it.
``shared``  computes no queries/keys: refines the map handed on by the previous block
            (the release alternates ``plain, shared, plain, shared, ...``).
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    calculate_drop_path_rates,
    get_device_dtype,
    register_notrace_function,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from refiner_pl.errors import UserInputError
from refiner_pl.models import fast_refiner

__all__ = [
    "AttentionMaps",
    "AttentionRefiner",
    "RefinerCfg",
    "RefinerViT",
    "TokenLabelOutput",
    "checkpoint_filter_fn",
    "release_to_refiner_pl",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class RefinerCfg:
    """How attention maps are refined and handed between blocks: one object for every layer.

    ``expansion``: heads H -> H x expansion inside the refiner; ``kernel_size``: its odd
    depthwise kernel; ``map_residual``: add ``scale x previous map`` after the softmax;
    ``channels_last``: run the refiner modules channels-last (not bit-compatible in training).
    """

    expansion: int = 3
    kernel_size: int = 3
    map_residual: bool = True
    channels_last: bool = False


# ----------------------------------------------------------------- layers
class ConvStem(nn.Module):
    """The release's convolutional patch stem: 7x7/2, 3x3, 3x3 convs with BN+ReLU, then a
    (p/2)x(p/2) projection with stride p/2, so the grid is img / p."""

    def __init__(
        self, patch_size: int, in_chans: int, embed_dim: int, hidden: int = 32, **dd: Any
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, hidden, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(hidden, **dd)
        self.conv2 = nn.Conv2d(hidden, hidden * 2, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(hidden * 2, **dd)
        self.conv3 = nn.Conv2d(hidden * 2, hidden * 4, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(hidden * 4, **dd)
        self.proj = nn.Conv2d(hidden * 4, embed_dim, patch_size // 2, patch_size // 2, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = fast_refiner.conv_stem(self, x)
            if fast is not None:
                return fast
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(x)))
        return self.proj(x)


class LinearPatchEmbed(nn.Module):
    """The plain ViT patch embedding: one p x p convolution with stride p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, **dd: Any) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = fast_refiner.patch_projection(self.proj, x)
            if fast is not None:
                return fast
        return self.proj(x)


class AttentionRefiner(nn.Module):
    """Refine(A) = A + BN(reduce(ReLU6(BN(dwconv(ReLU6(BN(expand(A)))))))).

    The (B, H, N, N) attention map is treated as an H-channel N x N image (query by key).
    """

    def __init__(self, num_heads: int, cfg: RefinerCfg | None = None, **dd: Any) -> None:
        super().__init__()
        cfg = cfg or RefinerCfg()
        self.channels_last = cfg.channels_last
        hidden = num_heads * cfg.expansion
        kernel = cfg.kernel_size
        self.expand = nn.Conv2d(num_heads, hidden, 1, bias=False, **dd)
        self.expand_bn = nn.BatchNorm2d(hidden, **dd)
        self.local = nn.Conv2d(
            hidden, hidden, kernel, padding=kernel // 2, groups=hidden, bias=False, **dd
        )
        self.local_bn = nn.BatchNorm2d(hidden, **dd)
        self.reduce = nn.Conv2d(hidden, num_heads, 1, bias=False, **dd)
        self.reduce_bn = nn.BatchNorm2d(num_heads, **dd)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        # Channels-last makes the 1x1 convs GEMMs over the heads; it reorders float sums,
        # which training-mode BatchNorm amplifies to ~1e-5 in the logits, so it is opt-in.
        x = attn.contiguous(memory_format=torch.channels_last) if self.channels_last else attn
        x = self.act(self.expand_bn(self.expand(x)))
        x = self.act(self.local_bn(self.local(x)))
        return self.reduce_bn(self.reduce(x)) + attn


class RefinerAttention(nn.Module):
    """Multi-head attention of one block kind; returns the output and the map it hands on.

    ``plain`` and ``refine`` blocks project queries, keys and values (``qkv``); ``shared``
    blocks project values only (``v``) and refine the map of the block before. A refining
    block multiplies the values with ``adapt_bn(refiner(map)) * scale``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_type: str = "plain",
        cfg: RefinerCfg | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        **dd: Any,
    ) -> None:
        super().__init__()
        cfg = cfg or RefinerCfg()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.block_type = block_type
        self.attn_map_residual = cfg.map_residual
        self.refiner_checkpointing = False
        shared = block_type == "shared"
        self.qkv = None if shared else nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd) if shared else None
        self.refiner, self.adapt_bn = None, None
        if block_type != "plain":
            self.refiner = AttentionRefiner(num_heads, cfg, **dd)
            self.adapt_bn = nn.BatchNorm2d(num_heads, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def refine(self, attn: torch.Tensor) -> torch.Tensor:
        """The refined map this block multiplies with the values."""
        if not torch.jit.is_scripting() and self.refiner_checkpointing and torch.is_grad_enabled():
            # Keep only the map for backward, not the 3x wider expanded maps: recomputed.
            return checkpoint_keeping_bn_stats(self, self._refine, attn)
        return self._refine(attn)

    def _refine(self, attn: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = fast_refiner.refine(self, attn)
            if fast is not None:
                return fast
        return self.adapt_bn(self.refiner(attn)) * self.scale

    def forward(
        self,
        x: torch.Tensor,
        prev_map: torch.Tensor | None,
        need_map: bool = True,
        maps_out: list[AttentionMaps] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = x.shape
        if self.v is not None:  # shared
            if prev_map is None:
                raise RuntimeError("a 'shared' block needs the attention map of the block before")
            v = self._heads(self.v(x))
            attn = self.refine(prev_map)
            next_map = prev_map  # the unrefined map goes on
            if maps_out is not None:
                maps_out.append(AttentionMaps(prev_map, attn))
        else:
            assert self.qkv is not None
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, dim).permute(2, 0, 1, 3).unbind(0)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            add_prev = self.attn_map_residual and prev_map is not None
            if self.refiner is None and not (need_map or add_prev or maps_out is not None):
                # Nobody reads this map: the fused kernel never materialises it.
                drop = self.attn_drop.p if self.training else 0.0
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
                out = out.transpose(1, 2).reshape(batch, tokens, dim)
                return self.proj_drop(self.proj(out)), None
            # scaling q costs a twelfth of scaling the N x N map
            attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
            if self.attn_map_residual and prev_map is not None:
                attn = add_scaled_map(attn, prev_map, self.scale)
            attn = self.attn_drop(attn)
            next_map = attn
            refined: torch.Tensor | None = None
            if self.refiner is not None:
                attn = refined = self.refine(attn)
            if maps_out is not None:
                maps_out.append(AttentionMaps(next_map, refined))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out)), next_map


@torch.fx.wrap
@register_notrace_function
def add_scaled_map(attn: torch.Tensor, prev_map: torch.Tensor, scale: float) -> torch.Tensor:
    """``attn + scale * prev_map``, in place where autograd allows (softmax's backward needs
    its output)."""
    if attn.requires_grad:
        return torch.add(attn, prev_map, alpha=scale)
    return attn.add_(prev_map, alpha=scale)


class ScaledInputLayerNorm(nn.LayerNorm):
    """``LayerNorm(x * input_scale)`` without the scaled copy: LayerNorm(c x, eps) equals
    LayerNorm(x, eps / c^2)."""

    def __init__(self, dim: int, input_scale: float, eps: float = 1e-6, **dd: Any) -> None:
        super().__init__(dim, eps=eps, **dd)
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps / (self.input_scale * self.input_scale)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, eps)


class RefinerBlock(nn.Module):
    """x + 2 * attn(LN(x / 2)), then x + 2 * gamma * MLP(LN(x / 2)), as released.

    ``hands_on_map`` (set by the model) says whether the next block reads this block's map.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_type: str = "plain",
        refiner_cfg: RefinerCfg | None = None,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float = 1e-5,
        attn_layer: type[nn.Module] = RefinerAttention,
        mlp_layer: type[nn.Module] = Mlp,
        **dd: Any,
    ) -> None:
        super().__init__()
        self.block_type = block_type
        self.hands_on_map = True
        self.branch_scale = 1 / RESIDUAL_SCALE
        self.norm1 = ScaledInputLayerNorm(dim, RESIDUAL_SCALE, **dd)
        self.attn = attn_layer(
            dim, num_heads, block_type, refiner_cfg, qkv_bias, attn_drop, proj_drop, **dd
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = ScaledInputLayerNorm(dim, RESIDUAL_SCALE, **dd)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        # The release multiplies the MLP output by gamma before its last dropout; an
        # elementwise scale commutes with dropout, so timm's LayerScale after Mlp is the same.
        self.ls2 = LayerScale(dim, init_values=init_values, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        prev_map: torch.Tensor | None,
        maps_out: list[AttentionMaps] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, next_map = self.attn(self.norm1(x), prev_map, self.hands_on_map, maps_out)
        x = torch.add(x, self.drop_path1(y), alpha=self.branch_scale)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return torch.add(x, y, alpha=self.branch_scale), next_map


def checkpoint_keeping_bn_stats(module: nn.Module, fn, *args):
    """``torch.utils.checkpoint`` of ``fn(*args)`` that keeps BatchNorm running stats exact.

    The backward pass re-runs ``fn``; the BatchNorms inside ``module`` would then update their
    running statistics twice per step. The first call updates them, the recomputation runs
    with momentum 0 and the batch count restored.
    """
    calls = 0

    def run(*args_):
        nonlocal calls
        calls += 1
        if calls == 1 or not module.training:
            return fn(*args_)
        saved = [
            (bn, bn.momentum, bn.num_batches_tracked.clone())
            for bn in module.modules()
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
        ]
        try:
            for bn, _, _ in saved:
                bn.momentum = 0.0
            return fn(*args_)
        finally:
            for bn, momentum, tracked in saved:
                bn.momentum = momentum
                bn.num_batches_tracked.copy_(tracked)

    return checkpoint(run, *args, use_reentrant=False)


@torch.fx.wrap
@register_notrace_function
def input_patch_grid(x: torch.Tensor, patch_size: int) -> list[int]:
    """The (rows, cols) patch grid of an NCHW input, or a clear error."""
    if x.dim() != 4 or x.shape[-2] % patch_size != 0 or x.shape[-1] % patch_size != 0:
        raise ValueError(
            f"input of shape {list(x.shape)} does not split into {patch_size}px patches: "
            f"resize or crop to a multiple of {patch_size}"
        )
    return [x.shape[-2] // patch_size, x.shape[-1] // patch_size]


@torch.fx.wrap
@register_notrace_function
def pos_embed_for_grid(
    pos_embed: torch.Tensor, grid: list[int], model_grid: list[int], dynamic: bool
) -> torch.Tensor:
    """The position embedding for a ``grid`` of patches: resampled when it is not the
    model's own (only with ``dynamic_img_size``)."""
    if grid[0] == model_grid[0] and grid[1] == model_grid[1]:
        return pos_embed
    if not dynamic:
        raise ValueError(
            f"the input's {grid[0]}x{grid[1]} patch grid is not the model's "
            f"{model_grid[0]}x{model_grid[1]}: resize the input, call set_input_size(), or "
            "build the model with dynamic_img_size=True"
        )
    return resample_abs_pos_embed(pos_embed, grid, model_grid, num_prefix_tokens=1)


# ----------------------------------------------------------------- model
class RefinerViT(nn.Module):
    """Refiner-ViT. Defaults are Refiner-ViT-S as released.

    ``forward(x)`` returns class logits ``cls + aux_weight * max_tokens(aux)`` (``cls`` alone
    without a token head, the pooled class token when ``num_classes=0``) in train and eval
    mode alike; ``forward_train`` gives the token-labelling output with MixToken;
    ``forward_cls`` gives class-token logits alone.
    """

    __jit_unused_properties__ = ["model_args"]

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
        dynamic_img_size: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size = to_2tuple(img_size)
        _check_args(img_size, patch_size, embed_dim, num_heads, stem, refiner_kernel_size)
        _check_global_pool(global_pool)
        block_types = _resolve_block_types(block_types, depth, refiner)
        self.refiner_cfg = RefinerCfg(
            expansion=refiner_expansion,
            kernel_size=refiner_kernel_size,
            # the plain-ViT baseline keeps blocks independent
            map_residual=refiner if attn_map_residual is None else attn_map_residual,
            channels_last=refiner_channels_last,
        )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.init_values = init_values
        self.num_prefix_tokens = 1
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.dynamic_img_size = dynamic_img_size
        self.stem = stem
        self.token_head = token_head
        self.aux_weight = aux_weight
        self.mix_token = mix_token
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.block_types = list(block_types)

        stem_layer = ConvStem if stem == "conv" else LinearPatchEmbed
        self.patch_embed = stem_layer(patch_size, in_chans, embed_dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            RefinerBlock(
                embed_dim,
                num_heads,
                kind,
                self.refiner_cfg,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                init_values=init_values,
                **dd,
            )
            for i, kind in enumerate(self.block_types)
        )
        self._link_blocks()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
            for i in range(depth)
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head, self.aux_head = self._class_heads(num_classes, **dd)
        self.init_weights()

    def _link_blocks(self) -> None:
        """A block's map is needed by the next one if that one refines it or adds it."""
        residual = self.refiner_cfg.map_residual
        for block, after in zip(self.blocks, [*self.block_types[1:], None], strict=True):
            block.hands_on_map = after is not None and (after == "shared" or residual)

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    @property
    def model_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture (saved with the weights)."""
        cfg = self.refiner_cfg
        return dict(
            img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
            num_classes=self.num_classes, embed_dim=self.embed_dim, depth=len(self.blocks),
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
            block_types=list(self.block_types), refiner_expansion=cfg.expansion,
            refiner_kernel_size=cfg.kernel_size, attn_map_residual=cfg.map_residual,
            stem=self.stem, token_head=self.token_head, aux_weight=self.aux_weight,
            init_values=self.init_values,
        )  # fmt: skip

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
    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The class head, and the token head beside it when there is one (as timm's
        distilled DeiT returns its two heads)."""
        return self.head if self.aux_head is None else (self.head, self.aux_head)

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class heads for ``num_classes`` (0: none, ``forward`` gives the pooled class
        token), on the model's device and dtype, in its train/eval mode."""
        if global_pool is not None:
            _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head, self.aux_head = self._class_heads(num_classes, **get_device_dtype(self))
        for head in (self.head, self.aux_head):
            if head is not None:
                head.apply(_init_linear_and_norm)
                head.train(self.training)

    def _class_heads(self, num_classes: int, **dd: Any) -> tuple[nn.Module, nn.Module | None]:
        """The class head and the token head (none without classes or ``token_head``)."""
        if num_classes <= 0:
            return nn.Identity(), None
        aux_head = nn.Linear(self.embed_dim, num_classes, **dd) if self.token_head else None
        return nn.Linear(self.embed_dim, num_classes, **dd), aux_head

    @torch.jit.ignore
    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None
    ) -> None:
        """Build for another input size: the position embedding is resampled to its grid."""
        if patch_size is not None and to_2tuple(patch_size) != to_2tuple(self.patch_size):
            raise UserInputError(
                f"patch_size={patch_size} cannot be changed: the stem's weights fix it at "
                f"{self.patch_size}; change img_size only"
            )
        if img_size is None:
            return
        img_size = to_2tuple(img_size)
        _check_img_size(img_size, self.patch_size)
        grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        if grid != self.grid_size:
            resampled = resample_abs_pos_embed(
                self.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=1
            )
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        self.img_size, self.grid_size = img_size, grid

    # ----------------------------------------------------------------- forward
    def _embed(
        self, x: torch.Tensor, mix_box: tuple[int, int, int, int] | None = None
    ) -> torch.Tensor:
        grid = input_patch_grid(x, self.patch_size)
        x = self.patch_embed(x)  # (B, D, gh, gw)
        if mix_box is not None:
            top, left, bottom, right = mix_box
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        model_grid = [self.grid_size[0], self.grid_size[1]]
        pos_embed = pos_embed_for_grid(self.pos_embed, grid, model_grid, self.dynamic_img_size)
        return self.pos_drop(x + pos_embed)

    def _run_blocks(
        self,
        x: torch.Tensor,
        take_indices: list[int],
        last_index: int,
        norm: bool = False,
        maps_out: list[AttentionMaps] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks 0..``last_index`` (all under TorchScript), and the tokens after the blocks
        in ``take_indices`` (normed with ``norm``)."""
        blocks = self.blocks
        if not torch.jit.is_scripting() and last_index < len(self.blocks) - 1:
            blocks = self.blocks[: last_index + 1]
        taken: list[torch.Tensor] = []
        prev_map: torch.Tensor | None = None
        for i, block in enumerate(blocks):
            if (
                not torch.jit.is_scripting()
                and self.grad_checkpointing
                and torch.is_grad_enabled()
                and maps_out is None
            ):
                x, prev_map = checkpoint_keeping_bn_stats(block, block, x, prev_map)
            else:
                x, prev_map = block(x, prev_map, maps_out)
            if i in take_indices:
                taken.append(self.norm(x) if norm else x)
        return x, taken

    def forward_features(
        self,
        x: torch.Tensor,
        mix_box: tuple[int, int, int, int] | None = None,
        maps_out: list[AttentionMaps] | None = None,
    ) -> torch.Tensor:
        """Tokens (B, 1 + G*G, D) after the final norm; ``mix_box`` applies MixToken and
        ``maps_out``, when given, collects every block's maps from this same pass."""
        x, _ = self._run_blocks(self._embed(x, mix_box), [], len(self.blocks) - 1, False, maps_out)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch tokens after the blocks in ``indices`` (the last n for an int, all for None),
        as (B, D, gh, gw) maps (``NCHW``) or (B, G*G, D) sequences (``NLC``); ``norm`` applies
        the final norm to them, ``stop_early`` runs no block after the last one taken. Returns
        them, or the final features (as ``forward_features``) and them."""
        if output_fmt not in ("NCHW", "NLC"):
            raise UserInputError(f"output_fmt='{output_fmt}' is unknown: use 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        last = max_index if stop_early else len(self.blocks) - 1
        x, intermediates = self._run_blocks(self._embed(x), take_indices, last, norm)
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            rows, cols = height // self.patch_size, width // self.patch_size
            intermediates = [
                y.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous()
                for y in intermediates
            ]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the heads)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        # the kept blocks keep their map handing, so their outputs stay exactly the taps
        self.blocks = self.blocks[: max_index + 1]
        self.block_types = self.block_types[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

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

    @torch.jit.ignore
    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token logits alone, without the token head."""
        return self.forward_head(self.forward_features(x), cls_only=True)

    @torch.jit.ignore
    def forward_attention_maps(self, x: torch.Tensor) -> list[AttentionMaps]:
        """Every block's raw and refined maps for input ``x``; the forward is unchanged."""
        maps: list[AttentionMaps] = []
        self.forward_features(x, maps_out=maps)
        return maps

    @torch.jit.ignore
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

    @torch.jit.ignore
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
                "forward_train needs the token head: build the model with token_head=True "
                "and num_classes > 0"
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained on another grid (e.g. 224 -> 448 fine-tuning) gets its position
        # embedding resampled, never silently re-initialised.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resample_pos_embed(state_dict[key], self.grid_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------- construction checks
def _check_args(img_size, patch_size, embed_dim, num_heads, stem, kernel_size) -> None:
    if stem not in ("conv", "linear"):
        raise UserInputError(f"stem={stem!r} is unknown: use 'conv' or 'linear'")
    if patch_size < 1 or (stem == "conv" and patch_size % 2):
        raise UserInputError(
            f"patch_size={patch_size} does not work with the {stem} stem: the conv stem "
            "downsamples by 2 first, so use an even patch size (e.g. 16) or stem='linear'"
        )
    _check_img_size(img_size, patch_size)
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


def _check_img_size(img_size: Sequence[int], patch_size: int) -> None:
    for side in img_size:
        if side < patch_size or side % patch_size:
            lower = max(patch_size, side // patch_size * patch_size)
            raise UserInputError(
                f"img_size {side} is not divisible by patch_size {patch_size}: use a "
                f"multiple of {patch_size}, e.g. {lower} or {lower + patch_size}"
            )


def _check_global_pool(global_pool: str) -> None:
    if global_pool != "token":
        raise UserInputError(
            f"global_pool={global_pool!r} is not supported: Refiner-ViT classifies from "
            "the class token; use global_pool='token'"
        )


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


# ----------------------------------------------------------------- release checkpoints
# Release files wrap the weights under one of these keys; EMA weights are the ones evaluated.
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")

_RELEASE_RENAMES = (
    (".attn.DLA.conv_exp.", ".attn.refiner.expand."),
    (".attn.DLA.bn1.", ".attn.refiner.expand_bn."),
    (".attn.DLA.depth_sep_conv.", ".attn.refiner.local."),
    (".attn.DLA.bn2.", ".attn.refiner.local_bn."),
    (".attn.DLA.conv_pro.", ".attn.refiner.reduce."),
    (".attn.DLA.bn3.", ".attn.refiner.reduce_bn."),
    (".mlp.scale_channel", ".ls2.gamma"),
)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a release-style file: EMA first, then ``state_dict`` / ``model``;
    ``module.`` prefixes (DataParallel/DDP) are stripped."""
    state_dict: Mapping[str, Any] = checkpoint
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping) and checkpoint[key]:
            state_dict = checkpoint[key]
            break
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out


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
        "refiner_vit_tiny.untrained": _cfg(crop_pct=1.0, input_size=32, num_classes=10),
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
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        RefinerViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
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

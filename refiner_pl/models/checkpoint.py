"""Reading release checkpoints and saving models in this project's own format.

Everything is loaded with ``torch.load(..., weights_only=True)``: a file that would run
code when unpickled is refused with a clear error instead.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from refiner_pl.checkpoint_io import atomic_torch_save, read_checkpoint
from refiner_pl.errors import UserInputError
from refiner_pl.models.refiner_vit import RefinerViT, release_to_refiner_pl, unwrap_state_dict

__all__ = [
    "InitReport",
    "from_official_checkpoint",
    "init_weights_from",
    "infer_model_args",
    "load_model",
    "read_checkpoint",
    "save_model",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)

MODEL_FORMAT = "refiner_pl.model"


def _block_indices(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})


def infer_model_args(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the whole architecture off the tensors of a state dict in our naming."""
    needed = (
        "cls_token",
        "pos_embed",
        "norm.weight",
        "blocks.0.norm1.weight",
        "blocks.0.ls2.gamma",
    )
    missing = [k for k in needed if k not in state_dict]
    if missing:
        hint = ""
        if "blocks.0.mlp.fc1.weight" in state_dict and "blocks.0.ls2.gamma" in missing:
            hint = " (it looks like a plain ViT/DeiT checkpoint: load it with timm instead)"
        raise UserInputError(
            f"this is not a Refiner-ViT state dict: keys {missing} are missing{hint}; pass the "
            "file of a Refiner-ViT release or of this project"
        )
    embed_dim = state_dict["cls_token"].shape[-1]
    blocks = _block_indices(state_dict)
    depth = len(blocks)
    if blocks != list(range(depth)):
        raise UserInputError(
            f"blocks {blocks} are not numbered 0..{depth - 1}: the file is damaged"
        )

    block_types, num_heads, expansion, kernel = [], None, 3, 3
    for i in blocks:
        has_qk = f"blocks.{i}.attn.qkv.weight" in state_dict
        refined = f"blocks.{i}.attn.refiner.expand.weight" in state_dict
        block_types.append(("refine" if has_qk else "shared") if refined else "plain")
        if refined:
            expand = state_dict[f"blocks.{i}.attn.refiner.expand.weight"]
            num_heads = expand.shape[1]
            expansion = expand.shape[0] // expand.shape[1]
            kernel = state_dict[f"blocks.{i}.attn.refiner.local.weight"].shape[-1]

    if "patch_embed.conv1.weight" in state_dict:
        stem = "conv"
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1] * 2
    else:
        stem = "linear"
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    in_chans = state_dict[
        "patch_embed.conv1.weight" if stem == "conv" else "patch_embed.proj.weight"
    ].shape[1]
    grid_tokens = state_dict["pos_embed"].shape[1] - 1
    grid = int(grid_tokens**0.5)
    if grid * grid != grid_tokens:
        raise UserInputError(
            f"pos_embed has {grid_tokens} patch tokens, not a square grid: pass img_size=... "
            "explicitly"
        )
    head = state_dict.get("head.weight")
    args: dict[str, Any] = {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "num_classes": head.shape[0] if head is not None else 0,
        "embed_dim": embed_dim,
        "depth": depth,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "qkv_bias": any(k.endswith((".attn.qkv.bias", ".attn.v.bias")) for k in state_dict),
        "block_types": block_types,
        "refiner_expansion": expansion,
        "refiner_kernel_size": kernel,
        "stem": stem,
        "token_head": "aux_head.weight" in state_dict,
    }
    if num_heads is not None:
        args["num_heads"] = num_heads
    return args


_HEADS = ("head.", "aux_head.")


def _load_keeping_backbone(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Load non-strictly; class heads sized for another class count start afresh.

    Returns the re-initialised head keys, the other missing keys and the unexpected keys.
    """
    own = model.state_dict()
    other_classes = any(
        k.startswith(_HEADS) and k in own and own[k].shape != v.shape for k, v in state_dict.items()
    ) or ("head.weight" in state_dict and "head.weight" not in own)  # a headless model
    reinitialised = [k for k in own if k.startswith(_HEADS)] if other_classes else []
    if other_classes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEADS)}
    # Tensors of another shape (another width, e.g. a DeiT checkpoint) are reported with the
    # unexpected keys instead of load_state_dict's error; the position embedding may differ
    # in its grid alone (it is resampled on load).
    mismatched = [
        k
        for k, v in state_dict.items()
        if k in own
        and own[k].shape != v.shape
        and not (k == "pos_embed" and own[k].shape[-1] == v.shape[-1])
    ]
    state_dict = {k: v for k, v in state_dict.items() if k not in mismatched}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in reinitialised]
    return reinitialised, missing, [*result.unexpected_keys, *mismatched]


def _build_and_load(
    state_dict: dict[str, torch.Tensor], model_args: dict[str, Any], source: str
) -> RefinerViT:
    model = RefinerViT(**model_args)
    reinitialised, missing, unexpected = _load_keeping_backbone(model, state_dict)
    if missing or unexpected:
        raise UserInputError(
            f"{source} does not match the architecture it describes: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "is the file complete and a Refiner-ViT?"
        )
    if reinitialised:  # transfer to another label set: backbone kept, fresh class heads
        _logger.warning(
            "%s has %d classes, model has %d: the class heads are re-initialised",
            source,
            state_dict["head.weight"].shape[0],
            model.num_classes,
        )
    return model.eval()


def from_official_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any
) -> RefinerViT:
    """Build a Refiner-ViT from a release checkpoint, inferring the architecture.

    Accepts a file path or an already loaded dict: a plain state dict, or one wrapped under
    ``state_dict_ema`` / ``state_dict`` / ``model`` (EMA preferred), with or without
    ``module.`` prefixes. ``overrides`` go to :class:`RefinerViT` (e.g. ``img_size=448``
    resamples the position embedding, ``num_classes=100`` starts new heads, ``drop_path_rate``).
    Returns the model in eval mode, loaded strictly.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "the state dict", path_or_state_dict
    else:
        source, raw = repr(str(path_or_state_dict)), read_checkpoint(path_or_state_dict)
    if raw.get("format") == MODEL_FORMAT:
        return load_model(raw, **overrides)
    state_dict = release_to_refiner_pl(unwrap_state_dict(raw))
    model_args = infer_model_args(state_dict)
    if "num_heads" not in model_args and "num_heads" not in overrides:
        raise UserInputError(
            f"{source} has no refiner blocks, so the head count cannot be read off it: "
            "pass num_heads=..."
        )
    return _build_and_load(state_dict, {**model_args, **overrides}, source)


def save_model(model: RefinerViT, path: str | os.PathLike) -> Path:
    """Save weights and architecture in this project's format (read by :func:`load_model`)."""
    payload = {
        "format": MODEL_FORMAT,
        "version": 1,
        "model_args": {**model.model_args, "img_size": list(model.model_args["img_size"])},
        "state_dict": model.state_dict(),
    }
    return atomic_torch_save(payload, path)


def load_model(
    path_or_payload: str | os.PathLike | Mapping[str, Any], **overrides: Any
) -> RefinerViT:
    """Load a model saved by :func:`save_model`; ``overrides`` change its construction."""
    if isinstance(path_or_payload, Mapping):
        source, payload = "the model file", path_or_payload
    else:
        source, payload = repr(str(path_or_payload)), read_checkpoint(path_or_payload)
    if payload.get("format") != MODEL_FORMAT:
        raise UserInputError(
            f"{source} is not a refiner_pl model file: use from_official_checkpoint() for "
            "release checkpoints"
        )
    return _build_and_load(
        dict(payload["state_dict"]), {**payload["model_args"], **overrides}, source
    )


def _weights_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights in any supported file, in our naming."""
    if checkpoint.get("format") == MODEL_FORMAT:
        return dict(checkpoint["state_dict"])
    if "pytorch-lightning_version" in checkpoint:  # ImageClassifier keeps the net in `model.`
        state_dict = checkpoint["state_dict"]
        return {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
    return release_to_refiner_pl(unwrap_state_dict(checkpoint))


class InitReport(NamedTuple):
    """What :func:`init_weights_from` did with each tensor of the model."""

    kept: list[str]
    resampled: list[str]
    reinitialised: list[str]

    def summary(self) -> str:
        parts = [f"kept {len(self.kept)} tensors"]
        if self.resampled:
            parts.append(f"resampled {', '.join(self.resampled)} to the new grid")
        if self.reinitialised:
            parts.append(f"re-initialised {', '.join(self.reinitialised)} (new class count)")
        return "; ".join(parts)


def init_weights_from(
    model: nn.Module, path_or_checkpoint: str | os.PathLike | Mapping[str, Any]
) -> InitReport:
    """Initialise ``model`` for fine-tuning from a release file, one of ours, or a Lightning
    checkpoint of this project, and say what was kept, resampled and re-initialised.

    A different patch grid resamples the position embedding; a different class count starts
    the class heads afresh; anything else that does not fit is an error.
    """
    if isinstance(path_or_checkpoint, Mapping):
        source, raw = "the checkpoint", path_or_checkpoint
    else:
        source, raw = repr(str(path_or_checkpoint)), read_checkpoint(path_or_checkpoint)
    state_dict = _weights_of(raw)
    own = model.state_dict()
    resampled = [
        k
        for k in ("pos_embed",)
        if k in state_dict and k in own and state_dict[k].shape != own[k].shape
    ]
    reinitialised, missing, unexpected = _load_keeping_backbone(model, state_dict)
    shapes = [
        f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}"
        for k in unexpected
        if k in own and k in state_dict
    ]
    # keys of another architecture, beyond tensors that only differ in shape
    foreign = [k for k in missing if k not in state_dict] + [k for k in unexpected if k not in own]
    if shapes and not foreign:
        raise UserInputError(
            f"{source} was trained with another model size: tensor shapes differ (file vs "
            f"model: {', '.join(shapes[:3])}); initialise from a checkpoint of the same "
            "architecture, or set model_name/model_kwargs to the file's"
        )
    if missing or unexpected:
        raise UserInputError(
            f"{source} does not fit model {type(model).__name__}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; initialise from a checkpoint of the "
            "same architecture (or change model_name/model_kwargs to match it)"
        )
    kept = [k for k in own if k not in reinitialised and k not in resampled]
    report = InitReport(kept, resampled, reinitialised)
    _logger.info("weights from %s: %s", source, report.summary())
    return report


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

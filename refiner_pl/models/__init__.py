"""Refiner-ViT models: the architecture, its timm presets and release-checkpoint loading."""

from refiner_pl.models.checkpoint import (
    InitReport,
    count_parameters,
    from_official_checkpoint,
    infer_model_args,
    init_weights_from,
    load_model,
    read_checkpoint,
    save_model,
    unwrap_state_dict,
)
from refiner_pl.models.refiner_vit import (
    PRESETS,
    AttentionMaps,
    AttentionRefiner,
    RefinerViT,
    TokenLabelOutput,
    checkpoint_filter_fn,
    release_to_refiner_pl,
    resample_pos_embed,
)

__all__ = [
    "InitReport",
    "PRESETS",
    "AttentionMaps",
    "AttentionRefiner",
    "RefinerViT",
    "TokenLabelOutput",
    "checkpoint_filter_fn",
    "count_parameters",
    "from_official_checkpoint",
    "infer_model_args",
    "init_weights_from",
    "load_model",
    "read_checkpoint",
    "release_to_refiner_pl",
    "resample_pos_embed",
    "save_model",
    "unwrap_state_dict",
]

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
)
from refiner_pl.models.fast_refiner import set_fast_refiner, use_fast_refiner
from refiner_pl.models.refiner_vit import (
    PRESETS,
    AttentionMaps,
    AttentionRefiner,
    RefinerCfg,
    RefinerViT,
    TokenLabelOutput,
    checkpoint_filter_fn,
    release_to_refiner_pl,
    resample_pos_embed,
    unwrap_state_dict,
)

__all__ = [
    "InitReport",
    "PRESETS",
    "AttentionMaps",
    "AttentionRefiner",
    "RefinerCfg",
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
    "set_fast_refiner",
    "unwrap_state_dict",
    "use_fast_refiner",
]

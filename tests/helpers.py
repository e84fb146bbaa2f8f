"""Small helpers shared by test modules (importable because pytest puts tests/ on the path)."""

import lightning as L


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})

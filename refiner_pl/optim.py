"""The optimizer and the per-step learning-rate schedule, built from timm's factories.

One function, `create_optimizer_and_schedule`, from plain values: the LightningModule passes
its hyperparameters and the run length the Trainer gives.
"""

from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from refiner_pl.errors import say

__all__ = ["create_optimizer_and_schedule"]


def create_optimizer_and_schedule(
    network: nn.Module,
    *,
    opt: str,
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    opt_eps: float | None,
    opt_betas: tuple[float, float] | None,
    sched: str,
    warmup_epochs: float,
    warmup_lr: float,
    min_lr: float,
    cooldown_epochs: float,
    total_steps: int,
    steps_per_epoch: int,
) -> Any:
    """timm's optimizer (decay off for norms, biases and ``no_weight_decay()`` names; layer
    decay when given) and, unless ``sched`` is ``none``, its schedule stepped per optimizer
    step, in the form ``LightningModule.configure_optimizers`` returns.

    Warm-up and cool-down are part of the run (``total_steps``): the lr rises from
    ``warmup_lr`` to exactly ``lr`` when warm-up ends, decays to ``min_lr`` over the steps
    left before the cool-down, and stays there. A run too short for both (a smoke run with
    ``max_epochs 1``, ``limit_train_batches``, ``fast_dev_run``) shortens them to half of it,
    with one warning line.
    """
    extra: dict[str, Any] = {}
    if opt_eps is not None:
        extra["eps"] = opt_eps
    if opt_betas is not None:
        extra["betas"] = tuple(opt_betas)
    optimizer = create_optimizer_v2(
        network, opt=opt, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **extra
    )
    if sched == "none":
        return optimizer

    edges = (warmup_epochs + cooldown_epochs) * steps_per_epoch
    if edges >= total_steps:
        scale = total_steps / 2 / edges
        warmup_epochs, cooldown_epochs = warmup_epochs * scale, cooldown_epochs * scale
        say(
            f"warning: warmup_epochs + cooldown_epochs ({edges:g} steps) do not fit in this "
            f"run's {total_steps} steps; shortened to {scale * edges:g} steps"
        )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched,
        # timm's num_epochs excludes warm-up and cool-down; here both are inside the run.
        num_epochs=total_steps / steps_per_epoch - warmup_epochs - cooldown_epochs,
        warmup_epochs=warmup_epochs,
        warmup_prefix=True,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        cooldown_epochs=cooldown_epochs,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
    }

"""`AttentionMonitor`: attention-diversity metrics and class-token attention maps in TensorBoard.

Every ``every_n_epochs`` epochs, at the end of validation, the callback runs the network once
more on a few fixed validation images (the first ones the validation loop serves) and logs,
per layer and for the ``raw`` and ``refined`` maps (see `refiner_pl.analysis.attention`):

* ``attention_head_similarity/<series>/layer_<l>``: mean cosine similarity between heads;
* ``attention_layer_similarity/<series>/layer_<l>_<l+1>``: similarity of adjacent layers;
* ``attention_distance/<series>/layer_<l>``: mean attention distance, in patches;

and, to each TensorBoard logger, the image ``attention_cls/<series>``: a row per image, its
input and the class token's head-averaged attention in every layer.

Nothing of it touches the training step: without the callback the model runs exactly as
before, and with it the cost is one forward pass on ``num_images`` images per logged epoch.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from refiner_pl.analysis.attention import (
    attention_grid_image,
    attention_summary,
    class_token_attention,
    collect_attention_maps,
    series_maps,
)
from refiner_pl.errors import UserInputError


class AttentionMonitor(L.Callback):
    """Logs attention-diversity metrics and class-token attention images while training.

    Enable it in a config with the ``attention`` section of ``cli.py``::

        attention:
          every_n_epochs: 1
          num_images: 16

    (or ``--attention.every_n_epochs 1`` on the command line), or in Python with
    ``Trainer(callbacks=[AttentionMonitor()])``. With the ``ema`` section on, it measures the
    weights the validation scored (the callback runs before EMA swaps them back).

    Args:
        every_n_epochs: log after the validation of every n-th epoch (epochs n, 2n, ...,
            counted from 1); ``validate`` always logs.
        num_images: validation images the metrics average over, the first ones served.
        num_display: how many of them the class-token attention images show.
        tile: side in pixels of each picture in those images.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 16, num_display: int = 4, tile: int = 64
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("num_images", num_images)):
            if value < 1:
                raise UserInputError(f"attention.{name} is {value}: use a whole number >= 1")
        if not 0 <= num_display <= num_images:
            raise UserInputError(
                f"attention.num_display is {num_display}: use 0 to num_images ({num_images})"
            )
        if tile < 8:
            raise UserInputError(f"attention.tile is {tile}: use at least 8 pixels")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.num_display = num_display
        self.tile = tile
        self._images: list[Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        network = getattr(pl_module, "model", None)
        if not hasattr(network, "forward_attention_maps"):
            raise UserInputError(
                f"the attention section needs a model that exposes its attention maps, and "
                f"{type(network).__name__} does not: use a refiner_vit_* model or drop the "
                "section"
            )
        if not trainer.loggers:
            rank_zero_warn("AttentionMonitor: the trainer has no logger, so nothing is logged")

    @property
    def images(self) -> Tensor | None:
        """The fixed validation images the metrics use (None before the first validation)."""
        return torch.cat(self._images)[: self.num_images] if self._images else None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # The validation loader does not shuffle: its first images are the same every epoch.
        held = sum(len(images) for images in self._images)
        if held < self.num_images and dataloader_idx == 0 and trainer.is_global_zero:
            images = batch[0] if isinstance(batch, list | tuple) else batch
            self._images.append(images[: self.num_images - held].detach().clone())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not trainer.loggers:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        images = self.images
        if images is None:
            return
        self.log_attention(trainer, pl_module.model, images)

    def log_attention(self, trainer: L.Trainer, network: torch.nn.Module, images: Tensor) -> None:
        """Computes and logs the metrics and images for ``images`` at the current step."""
        maps, grid = collect_attention_maps(network, images)
        metrics: dict[str, float] = {}
        pictures: dict[str, Tensor] = {}
        for series, layer_maps in series_maps(maps).items():
            if layer_maps is None:
                continue
            summary = attention_summary(layer_maps, grid, network.num_prefix_tokens)
            for layer, value in enumerate(summary["head_similarity"].tolist()):
                metrics[f"attention_head_similarity/{series}/layer_{layer}"] = value
            for layer, value in enumerate(summary["adjacent_layer_similarity"].tolist()):
                metrics[f"attention_layer_similarity/{series}/layer_{layer}_{layer + 1}"] = value
            for layer, value in enumerate(summary["attention_distance"].tolist()):
                metrics[f"attention_distance/{series}/layer_{layer}"] = value
            if self.num_display:
                shown = images[: self.num_display]
                cls_maps = class_token_attention([m[: len(shown)] for m in layer_maps], grid)
                pictures[f"attention_cls/{series}"] = attention_grid_image(
                    shown, cls_maps, self.tile
                )
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                for tag, picture in pictures.items():
                    logger.experiment.add_image(tag, picture, global_step=step)

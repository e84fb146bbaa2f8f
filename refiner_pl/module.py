"""`ImageClassifier`: a LightningModule around any timm-registered image classifier.

The module owns the recipe (loss, optimizer, learning-rate schedule, metrics) as plain typed
hyperparameters, so that `LightningCLI` can expose every one of them and `save_hyperparameters()`
can record them in checkpoints and in TensorBoard's HPARAMS tab.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import list_optimizers
from torch import Tensor, nn
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from refiner_pl.checkpoint_io import (
    ema_weights_in,
    no_ema_weights_message,
    read_checkpoint,
    verify_digest,
)
from refiner_pl.errors import UserInputError, first_line
from refiner_pl.lightning_compat import ensure_train_dataloader, tensorboard_file_writer
from refiner_pl.losses import TokenLabelLoss, attention_similarity_penalty
from refiner_pl.models import init_weights_from
from refiner_pl.optim import create_optimizer_and_schedule
from refiner_pl.seeding import seed_step
from refiner_pl.token_labelling import (
    LabelMapCrop,
    TokenLabelBatch,
    TokenLabelMixup,
    dense_label_targets,
)

Schedule = Literal["cosine", "tanh", "wsd", "rsqrt", "constant", "none"]
"""timm schedules that need nothing beyond warmup/min_lr/cooldown ("none" keeps lr constant)."""

SCHEDULES: tuple[str, ...] = Schedule.__args__  # type: ignore[attr-defined]

MixupMode = Literal["batch", "pair", "elem"]
"""How timm's Mixup draws its parameters: once per batch, per pair of images, per image."""

MIXUP_MODES: tuple[str, ...] = MixupMode.__args__  # type: ignore[attr-defined]


class ImageClassifier(L.LightningModule):
    """Train, evaluate and predict with a timm image classifier.

    Args:
        model_name: timm model name, e.g. ``refiner_vit_s`` (see ``timm.list_models('*refiner*')``).
        num_classes: number of classes; linked from the datamodule by the CLI.
        img_size: input resolution; linked from the datamodule by the CLI and only passed to
            models whose constructor accepts it (ViTs do, CNNs do not).
        pretrained: load timm's pretrained weights (needs them cached or a network).
        drop_rate: dropout before the classifier head.
        drop_path_rate: stochastic depth rate.
        model_kwargs: extra keyword arguments for ``timm.create_model``.
        grad_checkpointing: trade compute for memory with activation checkpointing.
        refiner_checkpointing: recompute only the refiners' expanded attention maps in
            backward (Refiner-ViT): most of the memory saving at a fraction of the cost.
        lr: peak (base) learning rate, reached at the end of warmup.
        weight_decay: decoupled weight decay; timm excludes biases, norms and
            ``model.no_weight_decay()`` names (pos_embed, cls_token, ...).
        opt: timm optimizer name (``timm.optim.list_optimizers()``).
        opt_eps: optimizer epsilon (None: the optimizer's default).
        opt_betas: optimizer betas (None: the optimizer's default).
        layer_decay: layer-wise lr decay in (0, 1]; None disables it.
        sched: learning-rate schedule after warmup, stepped on every optimizer step.
        warmup_epochs: linear warmup from ``warmup_lr`` to ``lr``, in (fractional) epochs.
        warmup_lr: learning rate at the first step.
        min_lr: learning rate at the end of the schedule.
        cooldown_epochs: epochs at ``min_lr`` at the end of training (part of max_epochs).
        label_smoothing: label smoothing of the training targets; with mixup/cutmix it is
            folded into the mixed targets (timm's ``Mixup(label_smoothing=...)``).
        mixup_alpha: mixup's Beta(alpha, alpha) parameter; 0 disables mixup (release: 0.8).
        cutmix_alpha: cutmix's Beta(alpha, alpha) parameter; 0 disables cutmix (release: 1.0).
        mixup_prob: probability of mixing a batch (or pair/image, see ``mixup_mode``).
        mixup_switch_prob: probability of cutmix instead of mixup when both are enabled.
        mixup_mode: draw the mixing parameters per ``batch``, ``pair`` or ``elem`` (image).
        mixup_off_epoch: stop mixing from this (0-based) epoch on, as timm's
            ``--mixup-off-epoch``: epochs ``0 .. mixup_off_epoch - 1`` mix, later ones train on
            label-smoothed hard targets; null mixes in every epoch.
        lr_base_size: scale ``lr`` linearly with the global batch: the peak lr becomes
            ``lr x global_batch / lr_base_size``, with ``global_batch = data.batch_size x
            world_size x trainer.accumulate_grad_batches`` (as timm's train.py, only ``lr`` is
            scaled, not ``warmup_lr`` or ``min_lr``); null uses ``lr`` as given.
        init_from: weights to start from (fine-tuning): a Refiner-ViT release file, a model
            saved with ``refiner_pl.models.save_model``, or a Lightning checkpoint of this
            project. Another grid resamples the position embedding; another class count
            starts the class heads afresh.
        token_label_weight: weight of the dense patch-token loss when the data carries label
            maps (``data.token_label_dir``; the release: 0.5).
        attn_similarity_weight: the release's optional attention-similarity penalty (its
            configs: 0.1); 0 disables it. It costs one extra forward pass per step.
        attn_similarity_pairs: how many leading pairs of consecutive blocks it compares.

    Mixup/CutMix (timm's ``Mixup``) run in ``training_step`` on the device, on whole batches,
    which must hold an even number of images; the loss is then timm's
    ``SoftTargetCrossEntropy``. ``train/acc1`` is measured against the class with the larger
    share of each mixed target (its argmax): a progress signal, not comparable with
    ``val/acc1``.
    """

    def __init__(
        self,
        model_name: str = "refiner_vit_s",
        num_classes: int = 1000,
        img_size: int = 224,
        pretrained: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        model_kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
        refiner_checkpointing: bool = False,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        opt: str = "adamw",
        opt_eps: float | None = None,
        opt_betas: tuple[float, float] | None = None,
        layer_decay: float | None = None,
        sched: Schedule = "cosine",
        warmup_epochs: float = 5,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        cooldown_epochs: int = 0,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: MixupMode = "batch",
        mixup_off_epoch: int | None = None,
        lr_base_size: int | None = None,
        init_from: str | None = None,
        token_label_weight: float = 0.5,
        attn_similarity_weight: float = 0.0,
        attn_similarity_pairs: int = 4,
    ) -> None:
        super().__init__()
        _check_hparams(locals())
        # init_from only shapes a fresh start: a checkpoint restored later brings its own
        # weights, so the file is not recorded (config.yaml in the run folder keeps it).
        self.save_hyperparameters(ignore=["init_from"])

        self.model = _create_model(
            model_name,
            num_classes=num_classes,
            img_size=img_size,
            pretrained=pretrained,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            **(model_kwargs or {}),
        )
        depth = len(getattr(self.model, "blocks", ()))
        if attn_similarity_weight > 0 and not hasattr(self.model, "forward_attention_maps"):
            raise UserInputError(
                f"attn_similarity_weight needs a model that exposes its attention maps, and "
                f"{model_name} does not: use a refiner_vit_* model or set it to 0"
            )
        if attn_similarity_weight > 0 and not 1 <= attn_similarity_pairs < depth:
            raise UserInputError(
                f"attn_similarity_pairs={attn_similarity_pairs} needs that many pairs of "
                f"consecutive blocks, and {model_name} has {depth} blocks: use 1 to {depth - 1}"
            )
        if init_from is not None:
            report = init_weights_from(self.model, init_from)
            rank_zero_info(f"model.init_from {init_from}: {report.summary()}")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if refiner_checkpointing:
            if not hasattr(self.model, "set_refiner_checkpointing"):
                raise UserInputError(
                    f"refiner_checkpointing needs a Refiner-ViT, and {model_name} is not one: "
                    "use grad_checkpointing instead"
                )
            self.model.set_refiner_checkpointing(True)

        # Batch-level mixing of images and targets; the mixed targets carry the smoothing.
        mixing = (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_prob > 0
        mix_args = dict(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=mixup_prob,
            switch_prob=mixup_switch_prob,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.mixup: Mixup | None = Mixup(mode=mixup_mode, **mix_args) if mixing else None
        # The same mixing for token-labelled batches, which also mixes the dense targets.
        self.token_mixup: TokenLabelMixup | None = (
            TokenLabelMixup(mode="batch", **mix_args) if mixing and mixup_mode == "batch" else None
        )
        self.token_label_loss = TokenLabelLoss(token_label_weight, label_smoothing)
        self.effective_lr: float | None = None  # the peak lr of the latest fit, once scaled

        # Hard targets: (smoothed) cross entropy. Soft targets (mixup/cutmix) already carry
        # their smoothing. Evaluation reports the plain cross entropy.
        self.train_criterion: nn.Module = (
            LabelSmoothingCrossEntropy(label_smoothing)
            if label_smoothing > 0
            else nn.CrossEntropyLoss()
        )
        self.soft_target_criterion = SoftTargetCrossEntropy()
        self.eval_criterion = nn.CrossEntropyLoss()

        # One metric object per stage: they keep their own state and sync across DDP ranks
        # when Lightning calls `compute()` at the end of the epoch.
        self.train_metrics = MetricCollection(
            {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}, prefix="train/"
        )
        eval_metrics = {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            eval_metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.val_metrics = MetricCollection(eval_metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # ----------------------------------------------------------------------------------- steps
    def training_step(
        self, batch: tuple[Tensor, Tensor] | TokenLabelBatch, batch_idx: int
    ) -> Tensor:
        if isinstance(batch, TokenLabelBatch):  # with label-map crops (data.token_label_dir)
            return self._token_label_step(*batch)
        x, y = batch
        if self.mixing:
            if y.is_floating_point():
                raise UserInputError(
                    "model.mixup_alpha/cutmix_alpha mix class-index targets, but this batch "
                    "already has soft targets; set both to 0 for soft-target data"
                )
            self.check_batch_size(x.shape[0])
            x, y = self.mixup(x, y)  # in place on the device; y: (B, C) soft targets
        maps = [] if self.hparams.attn_similarity_weight > 0 else None
        if maps is None:
            logits = self(x)
        else:  # the maps come from this same pass: BatchNorm statistics update once per step
            logits = self.model.forward_head(self.model.forward_features(x, maps_out=maps))
        if y.is_floating_point():  # soft targets (B, C), e.g. from mixup/cutmix
            loss = self.soft_target_criterion(logits, y)
            y = y.argmax(dim=-1)
        else:
            loss = self.train_criterion(logits, y)
        loss = loss + self._attn_similarity(maps)
        self.train_metrics.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _token_label_step(self, x: Tensor, y: Tensor, crops: LabelMapCrop) -> Tensor:
        """The release's token labelling: MixToken, class + 0.5 x dense loss on label maps."""
        model, hp = self.model, self.hparams
        if not hasattr(model, "forward_train"):
            raise UserInputError(
                f"token labelling needs a model with a token head, but {hp.model_name} has "
                "none: use a refiner_vit_* model or drop data.token_label_dir"
            )
        grid = (x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size)
        dense = dense_label_targets(crops, hp.num_classes, grid, smoothing=hp.label_smoothing)
        if self.mixing:
            if self.token_mixup is None:
                raise UserInputError(
                    "token labelling mixes whole batches: set model.mixup_mode to batch"
                )
            self.check_batch_size(x.shape[0])
            x, y, dense = self.token_mixup(x, y, dense, grid)
        maps = [] if hp.attn_similarity_weight > 0 else None
        out = model.forward_train(x, maps_out=maps)
        parts = self.token_label_loss.parts(out, y, dense)
        loss = parts.loss + self._attn_similarity(maps)
        target = y.argmax(dim=-1) if y.is_floating_point() else y
        self.train_metrics.update(out.cls_logits, target)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/dense_loss", parts.dense_loss)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _attn_similarity(self, maps: list | None) -> Tensor | float:
        """The release's optional penalty on similar maps in consecutive blocks (0 if off)."""
        if maps is None:
            return 0.0
        hp = self.hparams
        penalty = attention_similarity_penalty(
            maps, hp.attn_similarity_pairs, weight=hp.attn_similarity_weight
        )
        self.log("train/attn_similarity", penalty)
        return penalty

    @property
    def mixing(self) -> bool:
        """Whether this training epoch mixes batches (mixup/cutmix on, mixup_off_epoch ahead)."""
        off_epoch = self.hparams.mixup_off_epoch
        if self.mixup is None:
            return False
        return off_epoch is None or self.current_epoch < off_epoch

    def check_batch_size(self, batch_size: int) -> None:
        """Mixup/cutmix pair each image with its mirror in the batch: the size must be even."""
        if self.mixup is not None and batch_size % 2:
            raise UserInputError(
                f"mixup/cutmix need an even batch, but a batch holds {batch_size} images: "
                f"use an even data.batch_size (e.g. {batch_size + 1}) or set model.mixup_alpha "
                "and model.cutmix_alpha to 0"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The batch's logits, for callbacks (e.g. `ConfusionMatrixLogger`) to read."""
        return self._evaluate(batch, self.val_loss, self.val_metrics, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_metrics, "test")

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], loss: MeanMetric, metrics: MetricCollection, stage: str
    ) -> Tensor:
        x, y = batch
        logits = self(x)
        loss.update(self.eval_criterion(logits, y), weight=y.shape[0])
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log_dict(metrics, prog_bar=True)
        return logits

    def predict_step(
        self, batch: Tensor | tuple[Tensor, ...] | dict[str, Any], batch_idx: int
    ) -> Tensor | dict[str, Any]:
        """Class probabilities (B, num_classes) of images alone or of (images, ...) batches.

        A ``predict_dir`` batch (a dict, see `refiner_pl.data.predict`) gives a dict: the
        ``probs`` of its decoded images with their ``files``, and the ``failed`` files.
        """
        if isinstance(batch, dict):
            images = batch["images"]
            if images is None:  # no file of this batch decoded
                probs = torch.empty(0, self.hparams.num_classes, device=self.device)
            else:
                probs = self(images).softmax(dim=-1)
            return {"probs": probs, "files": batch["files"], "failed": batch["failed"]}
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=-1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout, drop path, Mixup/CutMix and MixToken boxes draw from the global RNGs:
        # seeded from (seed, epoch, batch, rank), a resumed run replays the steps of the
        # interrupted one exactly, and every DDP rank draws its own (seed_everything seeds
        # them all alike).
        seed_step(self.current_epoch, batch_idx, self.global_rank)

    # ------------------------------------------------------------------------------- logging
    def setup(self, stage: str) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if stage == "fit" and isinstance(batch_size, int):
            self.check_batch_size(batch_size)  # fail before the first batch, not during it

    def on_fit_start(self) -> None:
        # Fill TensorBoard's HPARAMS tab: the hyperparameters (datamodule's included, as the
        # Trainer logs them) against the final values of the validation metrics.
        datamodule = getattr(self.trainer, "datamodule", None)
        params = {**getattr(datamodule, "hparams", {}), **self.hparams}
        metrics = ["val/loss", *self.val_metrics.keys()]
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                _write_hparams_summary(logger, params, metrics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What a deployer needs besides the weights (read back by refiner_pl.export).
        preprocessing = deployment_config(getattr(self.trainer, "datamodule", None))
        if preprocessing:
            checkpoint[DEPLOYMENT_KEY] = preprocessing

    # ---------------------------------------------------------------- optimizer and schedule
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        peak_lr = self._peak_lr()
        total_steps, steps_per_epoch = (0, 1) if hp.sched == "none" else self._schedule_length()
        return create_optimizer_and_schedule(
            self.model,
            opt=hp.opt,
            lr=peak_lr,
            weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
            opt_eps=hp.opt_eps,
            opt_betas=hp.opt_betas,
            sched=hp.sched,
            warmup_epochs=hp.warmup_epochs,
            warmup_lr=hp.warmup_lr,
            min_lr=hp.min_lr,
            cooldown_epochs=hp.cooldown_epochs,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        # timm schedulers are stateless functions of the update count: Lightning calls this
        # after every optimizer step, when `global_step` already counts that step.
        scheduler.step_update(num_updates=self.global_step)

    def scaled_lr(self, global_batch: int) -> float:
        """The peak lr for `global_batch` images per optimizer step (see ``lr_base_size``)."""
        hp = self.hparams
        if hp.lr_base_size is None:
            return hp.lr
        lr = hp.lr * global_batch / hp.lr_base_size
        if lr < hp.min_lr:
            raise UserInputError(
                f"lr scaled to the global batch, {hp.lr:g} x {global_batch} / lr_base_size "
                f"{hp.lr_base_size} = {lr:g}, is below min_lr {hp.min_lr:g}: lower model.min_lr "
                "or model.lr_base_size, or raise the batch size"
            )
        return lr

    def _peak_lr(self) -> float:
        """``lr``, scaled by the trainer's global batch when ``lr_base_size`` is set."""
        hp = self.hparams
        if hp.lr_base_size is None:
            self.effective_lr = hp.lr
            return hp.lr
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:  # dataloaders given to fit() directly
            ensure_train_dataloader(trainer)
            per_device = getattr(trainer.train_dataloader, "batch_size", None)
        if not isinstance(per_device, int):
            raise UserInputError(
                "model.lr_base_size needs the per-device batch size, but neither the datamodule "
                "nor the train DataLoader has a batch_size; set model.lr_base_size null and "
                "give model.lr for your global batch"
            )
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        global_batch = per_device * world * accumulate
        self.effective_lr = self.scaled_lr(global_batch)
        rank_zero_info(
            f"lr {hp.lr:g} x global batch {global_batch} ({per_device} per device x {world} "
            f"devices x {accumulate} accumulated) / lr_base_size {hp.lr_base_size} = "
            f"{self.effective_lr:g}: the peak lr"
        )
        return self.effective_lr

    def _schedule_length(self) -> tuple[int, int]:
        """(total optimizer steps, optimizer steps per epoch) for the current trainer."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # max_epochs/max_steps, accumulation, devices
        if not math.isfinite(total):
            raise UserInputError(
                "the learning-rate schedule needs a finite run; set trainer.max_epochs or "
                "trainer.max_steps (or use model.sched: none)"
            )
        ensure_train_dataloader(trainer)  # max_steps runs skip loading it for the total
        batches = trainer.num_training_batches  # per device, after limit_train_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        else:  # iterable dataset of unknown length: spread the run over max_epochs
            steps_per_epoch = math.ceil(total / max(trainer.max_epochs or 1, 1))
        return int(total), max(steps_per_epoch, 1)


# ------------------------------------------------------------------------------------ helpers
@rank_zero_only
def _write_hparams_summary(logger: TensorBoardLogger, params: dict, metrics: list[str]) -> None:
    """Declares `metrics` as the HPARAMS-tab columns of `params`.

    `logger.log_hyperparams(params, metrics)` would do it too, but it also logs the metrics'
    placeholder values as scalars, putting a spurious point at step 0 of every val curve.
    """
    params = {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in params.items()
        if not key.startswith("_")  # LightningCLI's _class_path / _instantiator
    }
    writer = tensorboard_file_writer(logger)
    for summary in hparams_summary(params, dict.fromkeys(metrics, 0.0)):
        writer.add_summary(summary)


DEPLOYMENT_KEY = "deployment"
"""Checkpoint key of the class names and preprocessing the network was trained with."""


class TrainedNetwork(NamedTuple):
    """The eval-mode network of a Lightning checkpoint of this project."""

    network: nn.Module
    hparams: dict[str, Any]
    ema: bool  # whether `network` holds the checkpoint's EMA weights
    deployment: dict[str, Any]  # class names and preprocessing (empty for older files)


def network_from_checkpoint(ckpt_path: str | Path, ema: bool | None = None) -> TrainedNetwork:
    """The network of a checkpoint written by ``fit``: its EMA weights (``ema=True``), its raw
    weights (``False``) or the EMA weights when it has them (``None``)."""
    # Read unverified first: a wrong request (no EMA weights) is one line, before any note.
    checkpoint = read_checkpoint(ckpt_path, verify=False)  # memory-mapped; one line if damaged
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise UserInputError(
            f"{ckpt_path} is not a Lightning checkpoint of this project (no hyper_parameters or "
            "state_dict): pass a .ckpt written by `python cli.py fit`"
        )
    hparams = dict(checkpoint["hyper_parameters"])
    ema_weights = ema_weights_in(checkpoint)
    use_ema = ema_weights is not None if ema is None else ema
    if use_ema and ema_weights is None:
        raise UserInputError(no_ema_weights_message(ckpt_path))
    verify_digest(checkpoint, ckpt_path)
    deployment = dict(checkpoint.get(DEPLOYMENT_KEY) or {})
    try:  # pretrained=False: the checkpoint brings the weights, nothing is downloaded
        module = ImageClassifier.load_from_checkpoint(
            ckpt_path, map_location="cpu", pretrained=False, weights_only=True
        )
    except (TypeError, KeyError, RuntimeError) as err:  # another module, or mismatched weights
        raise UserInputError(
            f"{ckpt_path} does not rebuild as an ImageClassifier ({first_line(err)[:200]}): "
            "pass a checkpoint written by `python cli.py fit`"
        ) from None
    if use_ema:
        module.model.load_state_dict(ema_weights)
    return TrainedNetwork(module.model.eval(), hparams, use_ema, deployment)


def deployment_config(datamodule: Any) -> dict[str, Any]:
    """Class names, input size and eval preprocessing of a datamodule (empty if unknown)."""
    if datamodule is None or not hasattr(datamodule, "class_names"):
        return {}
    config: dict[str, Any] = {"class_names": list(datamodule.class_names)}
    for key in ("img_size", "mean", "std", "crop_pct", "interpolation"):
        value = getattr(datamodule, key, None)
        if value is not None:
            config[key] = list(value) if isinstance(value, tuple) else value
    return config


def _create_model(model_name: str, *, img_size: int, **kwargs: Any) -> nn.Module:
    """`timm.create_model`, passing `img_size` only to models whose constructor takes it."""
    try:
        return timm.create_model(model_name, img_size=img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return timm.create_model(model_name, **kwargs)


def _check_hparams(hp: dict[str, Any]) -> None:
    """Reject bad values at construction time, before anything is built or trained."""
    name = hp["model_name"]
    if not timm.is_model(name):
        candidates = timm.list_models()
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        close = close or timm.list_models("*refiner*") or candidates[:5]
        raise UserInputError(
            f"unknown model_name {name!r}; use a timm model name such as {', '.join(close)}"
        )
    opt = hp["opt"].lower().removeprefix("lookahead_")  # timm wraps any optimizer this way
    if opt not in list_optimizers():
        close = difflib.get_close_matches(opt, list_optimizers(), n=3)
        raise UserInputError(
            f"unknown opt {hp['opt']!r}; use one of timm.optim.list_optimizers(), "
            f"e.g. {', '.join(close or ['adamw', 'sgd', 'lamb'])}"
        )
    if hp["sched"] not in SCHEDULES:
        raise UserInputError(f"unknown sched {hp['sched']!r}; use one of {', '.join(SCHEDULES)}")
    if hp["num_classes"] < 2:
        raise UserInputError(f"num_classes must be at least 2, got {hp['num_classes']}")
    if hp["img_size"] < 1:
        raise UserInputError(f"img_size must be a positive number of pixels, got {hp['img_size']}")
    for key in ("lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "cooldown_epochs"):
        if hp[key] < 0 or (key == "lr" and hp[key] == 0):
            need = "> 0" if key == "lr" else ">= 0"
            raise UserInputError(f"{key} must be {need}, got {hp[key]}; fix model.{key}")
    if hp["min_lr"] > hp["lr"]:
        raise UserInputError(
            f"min_lr ({hp['min_lr']}) is above lr ({hp['lr']}); set model.min_lr below model.lr"
        )
    for key in ("drop_rate", "drop_path_rate", "label_smoothing"):
        if not 0 <= hp[key] < 1:
            raise UserInputError(f"{key} must be in [0, 1), got {hp[key]}; fix model.{key}")
    if hp["layer_decay"] is not None and not 0 < hp["layer_decay"] <= 1:
        raise UserInputError(
            f"layer_decay must be in (0, 1] or null, got {hp['layer_decay']}; fix model.layer_decay"
        )
    for key in ("token_label_weight", "attn_similarity_weight"):
        if hp[key] < 0:
            raise UserInputError(f"{key} must be >= 0, got {hp[key]}; fix model.{key}")
    if hp["attn_similarity_pairs"] < 1:
        raise UserInputError(
            f"attn_similarity_pairs must be >= 1, got {hp['attn_similarity_pairs']}; fix "
            "model.attn_similarity_pairs"
        )
    if hp["init_from"] is not None and not Path(hp["init_from"]).expanduser().is_file():
        raise UserInputError(
            f"init_from '{hp['init_from']}' is not a file: point model.init_from at a release, "
            "model or Lightning checkpoint"
        )
    if hp["opt_betas"] is not None and not all(0 <= b < 1 for b in hp["opt_betas"]):
        raise UserInputError(f"opt_betas must be in [0, 1), got {hp['opt_betas']}")
    if hp["opt_eps"] is not None and hp["opt_eps"] <= 0:
        raise UserInputError(f"opt_eps must be > 0, got {hp['opt_eps']}; fix model.opt_eps")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if hp[key] < 0:
            raise UserInputError(
                f"{key} must be >= 0 (0 disables it), got {hp[key]}; fix model.{key}"
            )
    for key in ("mixup_prob", "mixup_switch_prob"):
        if not 0 <= hp[key] <= 1:
            raise UserInputError(
                f"{key} is a probability in [0, 1], got {hp[key]}; fix model.{key}"
            )
    if hp["mixup_mode"] not in MIXUP_MODES:
        raise UserInputError(
            f"unknown mixup_mode {hp['mixup_mode']!r}; use one of {', '.join(MIXUP_MODES)}"
        )
    if hp["mixup_off_epoch"] is not None and hp["mixup_off_epoch"] < 1:
        raise UserInputError(
            f"mixup_off_epoch is {hp['mixup_off_epoch']}: give the first epoch without mixing "
            "(>= 1), null to mix in every epoch, or disable mixing with mixup_alpha/cutmix_alpha 0"
        )
    if hp["lr_base_size"] is not None and hp["lr_base_size"] < 1:
        raise UserInputError(
            f"lr_base_size is {hp['lr_base_size']}: give the global batch model.lr is meant for "
            "(e.g. 512), or null to use model.lr as given"
        )


__all__ = [
    "DEPLOYMENT_KEY",
    "ImageClassifier",
    "MIXUP_MODES",
    "SCHEDULES",
    "TrainedNetwork",
    "deployment_config",
    "network_from_checkpoint",
]

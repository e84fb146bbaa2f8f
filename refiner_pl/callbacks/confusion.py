"""`ConfusionMatrixLogger`: per-class accuracy and the confusion matrix of every validation.

The matrix is torchmetrics' `MulticlassConfusionMatrix`, filled from the logits that
``validation_step`` returns and summed over DDP ranks by torchmetrics when it is computed at
the end of the epoch; per-class accuracy (recall) is its diagonal over its row sums.

What goes to the loggers depends on the class count:

* up to ``max_image_classes`` classes: a scalar per class, ``val_class_acc/<i>_<name>``, and
  the figure ``val/confusion_matrix`` (TensorBoard's IMAGES tab), rows the true classes,
  columns the predicted ones, each row normalised to the share of that class's images;
* above it (ImageNet's 1000 classes): the histogram ``val/class_acc`` of the per-class
  accuracies and two tables in the TEXT tab, ``val/most_confused`` (the ``top_k`` largest
  off-diagonal entries: true class, predicted class, images, share of the true class) and
  ``val/least_accurate`` (the ``top_k`` classes with the lowest accuracy).
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from refiner_pl.errors import UserInputError

MAX_ANNOTATED_CLASSES = 12
"""Up to this many classes the figure prints each cell's value; beyond, colour only."""


class ConfusionMatrixLogger(L.Callback):
    """Logs per-class accuracy and the confusion matrix (or its most-confused pairs).

    Enable it in a config under ``trainer.callbacks``::

        trainer:
          callbacks:
            - class_path: refiner_pl.callbacks.ConfusionMatrixLogger
              init_args:
                max_image_classes: 30

    or in Python with ``Trainer(callbacks=[ConfusionMatrixLogger()])``. Class names come from
    ``trainer.datamodule.class_names`` when the datamodule has them, else the class indices.

    Args:
        max_image_classes: up to this many classes, log a scalar per class and the
            confusion-matrix figure; above it, a histogram of the per-class accuracies and
            tables of the most-confused pairs and the least accurate classes.
        top_k: rows of each of those tables.
    """

    def __init__(self, max_image_classes: int = 30, top_k: int = 20) -> None:
        if max_image_classes < 1:
            raise UserInputError(
                f"ConfusionMatrixLogger max_image_classes is {max_image_classes}: use a whole "
                "number >= 1, e.g. 30"
            )
        if top_k < 1:
            raise UserInputError(
                f"ConfusionMatrixLogger top_k is {top_k}: use a whole number >= 1, e.g. 20"
            )
        self.max_image_classes = max_image_classes
        self.top_k = top_k
        self.confusion: MulticlassConfusionMatrix | None = None
        self.matrix: Tensor | None = None
        """The latest validation's confusion matrix (true x predicted counts), on the CPU."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        num_classes = pl_module.hparams.get("num_classes") or getattr(
            trainer.datamodule, "num_classes", None
        )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise UserInputError(
                "ConfusionMatrixLogger needs the class count: use an ImageClassifier (its "
                "model.num_classes) or a datamodule with num_classes"
            )
        if self.confusion is None or self.confusion.num_classes != num_classes:
            self.confusion = MulticlassConfusionMatrix(num_classes)
        if not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            if not trainer.fast_dev_run:
                rank_zero_warn(
                    "ConfusionMatrixLogger: no TensorBoard logger, so the confusion matrix is "
                    "not logged"
                )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.confusion is not None
        # Here, not in setup(): the module is on its device by now; sync needs them together.
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, Tensor):
            raise UserInputError(
                f"ConfusionMatrixLogger needs validation_step to return the logits, and "
                f"{type(pl_module).__name__}'s returns {type(outputs).__name__}: use "
                "refiner_pl.module.ImageClassifier or drop the callback"
            )
        assert self.confusion is not None
        self.confusion.update(outputs.detach(), batch[1])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.confusion is not None
        if trainer.sanity_checking:
            return
        self.matrix = self.confusion.compute().cpu()  # every rank: the DDP sum is collective
        self.confusion.reset()
        if trainer.is_global_zero:
            self.log_matrix(trainer, self.matrix, _class_names(trainer, len(self.matrix)))

    def log_matrix(self, trainer: L.Trainer, matrix: Tensor, names: list[str]) -> None:
        """Logs what the class count calls for about ``matrix`` (true x predicted counts)."""
        accuracy = class_accuracy(matrix)
        step = trainer.global_step
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if len(matrix) <= self.max_image_classes:
            scalars = {
                f"val_class_acc/{_tag(i, name, len(names))}": value
                for i, (name, value) in enumerate(zip(names, accuracy.tolist(), strict=True))
                if value == value  # a class without validation images has no accuracy
            }
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
            for logger in tensorboards:
                logger.experiment.add_figure(
                    "val/confusion_matrix", self.figure(matrix, names), global_step=step
                )
            return
        for logger in tensorboards:
            seen = accuracy[~accuracy.isnan()]
            if len(seen):
                logger.experiment.add_histogram("val/class_acc", seen, global_step=step)
            logger.experiment.add_text(
                "val/most_confused", confused_pairs_table(matrix, names, self.top_k), step
            )
            logger.experiment.add_text(
                "val/least_accurate", least_accurate_table(matrix, names, self.top_k), step
            )

    def figure(self, matrix: Tensor, names: list[str]) -> Any:
        """The row-normalised matrix as a labelled matplotlib figure (torchmetrics' plot)."""
        # Imported here: pyplot takes a while to import and only drawing needs it.
        import matplotlib.pyplot as plt

        side = min(4 + 0.35 * len(matrix), 16)
        fig, ax = plt.subplots(figsize=(side, side), constrained_layout=True)
        assert self.confusion is not None
        self.confusion.plot(
            val=_row_normalised(matrix),
            ax=ax,
            add_text=len(matrix) <= MAX_ANNOTATED_CLASSES,
            labels=names,
        )
        ax.set_title("validation: share of each true class's images")
        return fig


def class_accuracy(matrix: Tensor) -> Tensor:
    """Per-class accuracy (recall): the diagonal over the row sums; NaN for empty rows."""
    counts = matrix.sum(dim=1).double()
    return matrix.diagonal().double() / counts.where(counts > 0, torch.nan)


def most_confused_pairs(matrix: Tensor, top_k: int) -> list[tuple[int, int, int]]:
    """The ``top_k`` largest off-diagonal entries as (true, predicted, count), count > 0;
    equal counts in row-major order (by true class, then predicted class)."""
    off_diagonal = matrix.clone()
    off_diagonal.fill_diagonal_(0)
    counts, flat = off_diagonal.flatten().sort(descending=True, stable=True)
    counts, flat = counts[:top_k], flat[:top_k]
    num_classes = len(matrix)
    return [
        (index // num_classes, index % num_classes, count)
        for count, index in zip(counts.tolist(), flat.tolist(), strict=True)
        if count > 0
    ]


def confused_pairs_table(matrix: Tensor, names: list[str], top_k: int) -> str:
    """Markdown table of the most-confused pairs, for TensorBoard's TEXT tab."""
    rows = ["| true class | predicted as | images | share of the true class |", "|---|---|---|---|"]
    totals = matrix.sum(dim=1).tolist()
    for true, predicted, count in most_confused_pairs(matrix, top_k):
        rows.append(
            f"| {_label(true, names)} | {_label(predicted, names)} | {count} "
            f"| {count / totals[true]:.1%} |"
        )
    if len(rows) == 2:
        return "no confusions: every validation image was classified correctly"
    return "\n".join(rows)


def least_accurate_table(matrix: Tensor, names: list[str], top_k: int) -> str:
    """Markdown table of the classes with the lowest accuracy (classes with images only)."""
    accuracy = class_accuracy(matrix)
    seen = (~accuracy.isnan()).nonzero().flatten()
    order = seen[accuracy[seen].argsort(stable=True)][:top_k].tolist()
    totals = matrix.sum(dim=1).tolist()
    rows = ["| class | accuracy | images |", "|---|---|---|"]
    rows += [f"| {_label(i, names)} | {accuracy[i]:.1%} | {totals[i]} |" for i in order]
    return "\n".join(rows)


def _row_normalised(matrix: Tensor) -> Tensor:
    counts = matrix.sum(dim=1, keepdim=True).clamp(min=1)
    return matrix.float() / counts


def _class_names(trainer: L.Trainer, num_classes: int) -> list[str]:
    """The datamodule's class names when it has the right number of them, else indices."""
    names = getattr(trainer.datamodule, "class_names", None)
    if isinstance(names, list | tuple) and len(names) == num_classes:
        return [str(name) for name in names]
    return [str(i) for i in range(num_classes)]


def _label(index: int, names: list[str]) -> str:
    """``3: cat``, or ``3`` where the class names are the indices."""
    name = names[index]
    return name if name == str(index) else f"{index}: {name}"


def _tag(index: int, name: str, num_classes: int) -> str:
    """``03_red_fox``: the zero-padded index (TensorBoard sorts tags as text) and the name
    in letters, digits and ``.-_`` (the index alone where the names are the indices)."""
    padded = f"{index:0{len(str(num_classes - 1))}d}"
    if name == str(index):
        return padded
    return padded + "_" + re.sub(r"[^\w.-]+", "_", name).strip("_")

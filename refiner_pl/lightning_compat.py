"""Every use of Lightning internals, in one place, each behind a named function.

Lightning's public API does not cover these; when an upgrade moves one, this module (and its
tests, ``tests/test_lightning_compat.py``) is the only place to change.
"""

from __future__ import annotations

import signal
from types import FrameType

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = [
    "batch_index",
    "batches_done_this_epoch",
    "ensure_train_dataloader",
    "notify_sigterm",
    "tensorboard_file_writer",
]


def batches_done_this_epoch(trainer: L.Trainer) -> int:
    """Batches of the current epoch the fit loop has already trained (after a resume too);
    0 for an object without a fit loop (a datamodule used outside a Trainer)."""
    fit_loop = getattr(trainer, "fit_loop", None)
    return fit_loop.epoch_loop.batch_progress.current.ready if fit_loop is not None else 0


def batch_index(trainer: L.Trainer) -> int:
    """Index of the training batch being run in the current epoch."""
    return trainer.fit_loop.epoch_loop.batch_idx


def ensure_train_dataloader(trainer: L.Trainer) -> None:
    """Builds the train loader when Lightning has not yet (``max_steps`` runs skip it while
    estimating the run length), so that its length and batch size can be read."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()


def tensorboard_file_writer(logger: TensorBoardLogger):  # noqa: ANN201 (tensorboard's type)
    """The event-file writer behind a TensorBoard logger, to add raw summaries."""
    return logger.experiment._get_file_writer()


def notify_sigterm(trainer: L.Trainer, signum: int, frame: FrameType | None) -> None:
    """Treats `signum` as Lightning treats SIGTERM: the fit loop stops after this batch
    (all DDP ranks together) and raises ``SIGTERMException``."""
    trainer._signal_connector._sigterm_notifier_fn(signal.Signals(signum), frame)

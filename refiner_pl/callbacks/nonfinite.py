"""What a NaN or infinite training loss does: stop the run cleanly, or skip that step."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from refiner_pl.checkpoint_io import first_non_finite
from refiner_pl.errors import UserInputError
from refiner_pl.lightning_compat import batch_index

NonFiniteAction = Literal["stop", "skip"]


class NonFiniteLossError(UserInputError):
    """The training loss became NaN or infinite (the CLI prints it as one ``error:`` line)."""


class NonFiniteLoss(L.Callback):
    """Stops the run, or skips the optimizer step, when the training loss is not finite.

    Args:
        action: ``stop`` (default): raise `NonFiniteLossError` before the loss is
            back-propagated, so the weights never take the step and no later checkpoint is
            written (the previous ones stay as they were). The message says whether the
            batch itself held NaN/inf values. ``skip``: drop the optimizer step whose
            gradients are not finite and go on; the BatchNorm statistics that the batch
            changed are put back too, so the step leaves no trace (the learning-rate
            schedule still counts it). Every skipped step is reported.
        max_consecutive_skips: with ``skip``, stop anyway after this many skipped steps in a
            row: then the run has diverged rather than met a bad batch.

    The check costs one host-device synchronisation per step (the progress bar already
    makes one to show the loss), plus, under DDP, one tiny all-reduce per step so that all
    ranks stop together; ``skip`` decides on the all-reduced gradients, the same on every
    rank.
    """

    def __init__(self, action: NonFiniteAction = "stop", max_consecutive_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise UserInputError(f"nonfinite_loss.action {action!r} is unknown: use stop or skip")
        if max_consecutive_skips < 1:
            raise UserInputError(
                f"nonfinite_loss.max_consecutive_skips is {max_consecutive_skips}: give the "
                "number of skipped steps in a row after which the run stops (e.g. 10)"
            )
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self._in_a_row = 0
        self._batch: Any = None
        self._buffers: list[Tensor] = []

    # ------------------------------------------------------------------------------ hooks
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the first batch of a step
            # BatchNorm running statistics change in the forward pass, before any check.
            self._buffers = [buffer.detach().clone() for buffer in pl_module.buffers()]

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        if self.action != "stop":
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        self._restore_buffers(pl_module)
        raise NonFiniteLossError(self._stop_message(trainer, loss))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.action != "skip":
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        largest = torch.stack([torch.linalg.vector_norm(g, math.inf) for g in grads]).amax()
        if torch.isfinite(largest):  # NaN propagates through the max
            self._in_a_row = 0
            return
        for param in params:  # optimizers leave parameters without a gradient untouched
            param.grad = None
        self._restore_buffers(pl_module)
        self.skipped += 1
        self._in_a_row += 1
        where = _where(trainer)
        if self._in_a_row >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"training stopped: {self._in_a_row} steps in a row had NaN/inf gradients (the "
                f"last at {where}), so the run has diverged: restart from an earlier checkpoint "
                "with a lower model.lr or with trainer.gradient_clip_val set"
            )
        rank_zero_warn(
            f"skipped the optimizer step at {where}: its gradients are NaN/inf "
            f"({self.skipped} skipped in this run; nonfinite_loss.action: skip)"
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before any checkpoint of this validation is written (checkpoint callbacks run
        last): weights that give a NaN/inf validation score must not become "best" or "last"."""
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        bad = [
            f"{key} {float(value)}"
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val") and not bool(torch.isfinite(torch.as_tensor(value)).all())
        ]
        weight = first_non_finite(pl_module.state_dict())
        if weight is not None:
            bad.append(f"weight {weight}")
        if trainer.strategy.reduce_boolean_decision(not bad, all=True):
            return
        raise NonFiniteLossError(
            f"training stopped: after epoch {trainer.current_epoch} (global step "
            f"{trainer.global_step}) {', '.join(bad[:3]) or 'another device'} is NaN/inf, so the "
            "training diverged and this epoch's checkpoints were not written (the files on disk "
            "are the last good ones); resume from one of them with a lower model.lr or with "
            "trainer.gradient_clip_val set"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._batch = None  # do not keep the batch alive until the next one

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # ------------------------------------------------------------------------ helpers
    def _restore_buffers(self, pl_module: L.LightningModule) -> None:
        if not self._buffers:
            return
        with torch.no_grad():
            for buffer, saved in zip(pl_module.buffers(), self._buffers, strict=True):
                buffer.copy_(saved)

    def _stop_message(self, trainer: L.Trainer, loss: Tensor) -> str:
        value = loss.detach().float().flatten()[0].item() if loss.numel() else float("nan")
        bad_inputs = _non_finite_inputs(self._batch)
        if bad_inputs:
            cause = (
                f"the batch holds {bad_inputs} NaN/inf input values: fix or drop those samples "
                "in the data"
            )
        else:
            cause = (
                "the inputs are finite, so the training diverged: restart from an earlier "
                "checkpoint with a lower model.lr or with trainer.gradient_clip_val set, or "
                "resume with --nonfinite_loss.action skip to skip such steps"
            )
        return (
            f"training stopped: the loss is {value} at {_where(trainer)} and no step was "
            f"taken with it (the checkpoints are as they were); {cause}"
        )


def _where(trainer: L.Trainer) -> str:
    """``epoch E, batch B (global step S)`` of the batch being trained."""
    batch = batch_index(trainer)
    return f"epoch {trainer.current_epoch}, batch {batch} (global step {trainer.global_step})"


def _non_finite_inputs(batch: Any) -> int:
    """How many values of the batch's images (its first tensor) are NaN or infinite."""
    images = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(images, Tensor) or not images.is_floating_point():
        return 0
    return int((~torch.isfinite(images)).sum())

"""`PreemptionCheckpoint`: a scheduler's stop signal saves an exactly resumable last checkpoint.

Cluster schedulers pre-empt a job with SIGTERM (SLURM, Kubernetes) and give it a grace
period. Lightning stops the fit loop after the running batch and raises ``SIGTERMException``,
which exits with status 0: a requeue script or a ``fit && export`` chain then takes a
half-trained run for a finished one, and everything since the last checkpoint is lost. This
callback writes ``last.ckpt`` at that batch (the loop position, the sampler's epoch and
position, every RNG seed the run derives: the rerun continues exactly), and ``cli.py`` exits
with status 128 + signal, as a killed process would. SIGUSR1 is handled alike unless
Lightning's SLURM auto-requeue owns it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from refiner_pl.errors import say
from refiner_pl.lightning_compat import notify_sigterm

_received = {"signal": int(signal.SIGTERM)}


def preemption_signal() -> int:
    """The signal number of the latest pre-emption (SIGTERM unless SIGUSR1 came)."""
    return _received["signal"]


class PreemptionCheckpoint(L.Callback):
    """Saves ``last.ckpt`` when a pre-emption signal stops ``fit``.

    Args:
        enabled: save on SIGTERM (and SIGUSR1); off, Lightning's own handling is left as is
            (the process still exits with a non-zero status).

    The file is the one the ``last_checkpoint`` section names (``<run>/checkpoints/last.ckpt``);
    rerunning the same command with a fixed ``trainer.logger.init_args.version``, or with
    ``--ckpt_path last``, resumes from it.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.saved: Path | None = None
        self._previous_usr1: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _received["signal"] = int(signal.SIGTERM)
        usr1 = getattr(signal, "SIGUSR1", None)
        if not self.enabled or usr1 is None or signal.getsignal(usr1) is not signal.SIG_DFL:
            return  # e.g. Lightning's SLURM requeue handler

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            _received["signal"] = signum
            notify_sigterm(trainer, signum, frame)

        self._previous_usr1 = signal.signal(usr1, on_usr1)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not self.enabled or not isinstance(exception, SIGTERMException):
            return
        name = signal.Signals(_received["signal"]).name
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.fast_dev_run:
            say(f"stopped by {name} before training started: nothing to save")
            return
        path = _last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        say(
            f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
            f"saved {path}; rerun the same command (fixed trainer.logger.init_args.version, "
            "or --ckpt_path last) to resume"
        )


def _last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` of the unmonitored ModelCheckpoint (the CLI's last_checkpoint section)."""
    for callback in trainer.checkpoint_callbacks:
        if (
            isinstance(callback, ModelCheckpoint)
            and callback.monitor is None
            and callback.dirpath
            and "{" not in (callback.filename or "{")
        ):
            return Path(callback.dirpath) / f"{callback.filename}{callback.FILE_EXTENSION}"
    folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    return folder / "last.ckpt"

"""`refiner_pl.lightning_compat`: each Lightning internal it reads still means what we use it
for, checked on a real Trainer. When a Lightning upgrade breaks one, it fails here first."""

import signal

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl import lightning_compat as compat


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[tuple[int, int, int]] = []  # (batch_idx, batch_index, batches done)
        self.train_batches_at_configure: int | None = None

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.seen.append(
            (
                batch_idx,
                compat.batch_index(self.trainer),
                compat.batches_done_this_epoch(self.trainer),
            )
        )

    def configure_optimizers(self):
        compat.ensure_train_dataloader(self.trainer)
        self.train_batches_at_configure = len(self.trainer.train_dataloader)
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=3)  # 4 batches


def test_batch_counters_follow_the_fit_loop():
    module = Linear()
    quiet_trainer(max_epochs=2).fit(module)
    # at the start of batch i of an epoch, i batches of it are done (the fetch of i is counted)
    assert module.seen == [(i, i, i + 1) for i in range(4)] * 2


def test_the_train_loader_exists_before_lightning_builds_it():
    module = Linear()
    quiet_trainer(max_steps=2).fit(module)  # max_steps: Lightning skips the loader at first
    assert module.train_batches_at_configure == 4


def test_without_a_fit_loop_no_batch_is_done():
    assert compat.batches_done_this_epoch(object()) == 0


def test_the_tensorboard_writer_takes_raw_summaries(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    writer = compat.tensorboard_file_writer(logger)
    writer.add_summary(torch.utils.tensorboard.summary.scalar("raw", 1.5), 0)
    writer.flush()
    assert list((tmp_path / "version_0").glob("events.out.tfevents.*"))


class SignalAtBatch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            compat.notify_sigterm(trainer, signal.SIGUSR1, None)


def test_a_notified_signal_stops_the_fit_as_sigterm_does():
    trainer = quiet_trainer(max_epochs=1, callbacks=[SignalAtBatch()])
    with pytest.raises(SIGTERMException):
        trainer.fit(Linear())
    assert trainer.received_sigterm and trainer.global_step == 2

"""`PreciseBN`: running statistics recomputed for the weights that validation scores."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import QUICKSTART, QUIET, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.callbacks import EMA, PreciseBN


class InputNorm(L.LightningModule):
    """Dropout, then a BatchNorm of the inputs: with dropout off, the recomputed running
    mean over the whole (evenly batched) train set is exactly the train set's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 2))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data() -> tuple[torch.Tensor, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator) * 3 + torch.arange(4.0)
    y = torch.randint(0, 2, (64,), generator=generator)
    return x, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def test_statistics_are_recomputed_without_dropout_for_both_weight_sets():
    x, loader = _data()
    module, precise = InputNorm(), PreciseBN(num_batches=8)  # 8 x 8 = the whole train set
    ema = EMA(decay=0.5)
    trainer = quiet_trainer(max_epochs=2, callbacks=[ema, precise], limit_val_batches=1)
    torch.manual_seed(1)
    trainer.fit(module, loader, loader)
    bn = module.model[1]
    # dropout was off: exactly the data's mean (momentum updates would give something else)
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(ema.module[1].running_mean, x.mean(0), rtol=0, atol=1e-5)
    assert int(bn.num_batches_tracked) == 2 * 8  # the training count, not reset
    assert bn.momentum == 0.1 and precise.seconds > 0


def test_global_rng_is_left_as_it_was():
    _, loader = _data()
    module, trainer = InputNorm(), quiet_trainer(max_epochs=1, limit_val_batches=1)
    precise = PreciseBN(num_batches=2)
    trainer.fit(module, loader, loader)
    state = torch.random.get_rng_state()
    precise.recompute(trainer, module)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_num_batches_must_be_positive():
    with pytest.raises(ValueError, match="precise_bn.num_batches is 0"):
        PreciseBN(num_batches=0)


@pytest.mark.slow
def test_two_epoch_quickstart_validates_honestly(run_cli, tmp_path):
    # The running statistics of the refiner's BatchNorms lag the weights: without precise BN
    # this run logged val/acc1 0.33 (0.886 once recomputed).
    run_cli("fit", "--config", QUICKSTART, "--trainer.max_epochs", "2", *QUIET).check()
    best = next((tmp_path / "runs/quickstart/version_0/checkpoints").glob("epoch=1-*"))
    assert float(best.stem.split("val_acc1=")[1]) >= 0.80
    # The checkpoint holds those statistics: validating it gives the logged score.
    run_cli("validate", "--config", QUICKSTART, "--ckpt_path", str(best), *QUIET).check()
    results = tmp_path / "runs/quickstart/version_0/validate" / best.stem / "validate_results.json"
    assert json.loads(results.read_text())["top1"] == pytest.approx(
        float(best.stem.split("val_acc1=")[1]), abs=1e-4
    )

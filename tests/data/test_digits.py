"""DigitsDataModule: the offline quickstart dataset shipped with scikit-learn."""

import lightning as L
import pytest
import torch
from torch import nn

from refiner_pl.data import DigitsDataModule
from refiner_pl.errors import UserInputError


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    return dm


def test_classes_and_split_sizes(digits):
    assert digits.num_classes == 10
    assert digits.class_names == [str(d) for d in range(10)]
    assert len(digits.train_set) == 1437 and len(digits.val_set) == 360  # 1,797 images, 20% val
    # Stratified: every digit keeps its share (~36 of ~180 each) in val.
    counts = torch.bincount(digits.val_set.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_batches_shape_dtype_and_normalisation(digits):
    images, targets = next(iter(digits.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.int64
    assert len(digits.train_dataloader()) == 1437 // 32  # drop_last

    val = torch.cat([x for x, _ in digits.val_dataloader()])
    assert val.shape == (360, 3, 32, 32)
    assert torch.equal(val[:, 0], val[:, 1]) and torch.equal(val[:, 0], val[:, 2])  # grey
    # Statistics come from the train split, so val is only approximately standardised.
    assert abs(val.mean().item()) < 0.05 and abs(val.std().item() - 1) < 0.05
    assert digits.mean[0] == digits.mean[2] and 0 < digits.mean[0] < 1


def test_train_stats_standardise_the_train_split_exactly():
    dm = DigitsDataModule(augment=False, img_size=16)
    dm.setup("fit")
    train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert train.shape[1:] == (3, 16, 16)
    assert train.mean().item() == pytest.approx(0, abs=1e-4)
    assert train.std().item() == pytest.approx(1, abs=1e-3)


def test_augmentation_is_random_on_train_only(digits):
    a, _ = digits.train_set[0]
    b, _ = digits.train_set[0]
    assert not torch.equal(a, b)
    assert torch.equal(digits.val_set[0][0], digits.val_set[0][0])
    plain = DigitsDataModule(augment=False)
    plain.setup("fit")
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


def test_split_is_fixed_by_the_seed():
    def val_targets(seed: int) -> torch.Tensor:
        dm = DigitsDataModule(split_seed=seed)
        dm.setup("validate")
        return dm.val_set.targets

    assert torch.equal(val_targets(0), val_targets(0))
    assert not torch.equal(val_targets(0), val_targets(1))


def test_test_loader_falls_back_to_val():
    dm = DigitsDataModule()
    dm.setup("test")
    assert dm.test_set is None and dm.test_dataloader().dataset is dm.val_set


@pytest.mark.slow
def test_trainer_runs_fit_validate_and_test():
    """The datamodule plugs into a real Trainer (hooks, sampler injection, loaders)."""

    class Linear(L.LightningModule):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes))

        def training_step(self, batch, batch_idx):
            images, targets = batch
            return nn.functional.cross_entropy(self.net(images), targets)

        def validation_step(self, batch, batch_idx):
            images, targets = batch
            acc = (self.net(images).argmax(1) == targets).float().mean()
            self.log("val_acc", acc)

        test_step = validation_step

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    L.seed_everything(0)
    dm = DigitsDataModule(img_size=16, batch_size=64)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Linear(dm.num_classes)
    trainer.fit(model, datamodule=dm)
    # Far above chance (0.1): images and labels line up in both splits.
    assert trainer.callback_metrics["val_acc"] > 0.8
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert result["val_acc"] > 0.8


def test_hyperparameters_hold_exactly_the_init_args():
    dm = DigitsDataModule(batch_size=16, split_seed=3)
    assert dm.hparams["batch_size"] == 16 and dm.hparams["split_seed"] == 3
    assert dm.hparams["crop_pct"] is None  # the base's arguments, forwarded through **kwargs
    assert DigitsDataModule(**dm.hparams).hparams == dm.hparams  # as load_from_checkpoint does


def test_a_crop_for_the_digits_is_refused():
    with pytest.raises(UserInputError, match="crop_pct does not apply to the digits"):
        DigitsDataModule(crop_pct=0.875)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size is 0: it must be >= 1"),
        ({"num_workers": -1}, "num_workers is -1"),
        ({"img_size": 0}, "img_size is 0"),
        ({"val_fraction": 1.0}, "val_fraction is 1.0"),
        ({"interpolation": "area"}, "interpolation 'area' is unknown here"),
        ({"mean": (0.5, 0.5, 0.5, 0.5)}, "mean has 4 values"),
        ({"std": (0.5, -1.0, 0.5)}, "std .* has a value <= 0"),
    ],
)
def test_bad_arguments_fail_at_init(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        DigitsDataModule(**kwargs)

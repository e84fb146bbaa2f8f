"""configs/data/*.yaml load through LightningCLI exactly as `--data configs/data/<name>.yaml`."""

import lightning as L
import pytest
from helpers import CONFIGS
from lightning.pytorch.cli import LightningCLI

from refiner_pl import data
from refiner_pl.errors import UserInputError

DATA_CONFIGS = CONFIGS / "data"


class _Model(L.LightningModule):
    def __init__(self, num_classes: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes


class _CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The link the project CLI relies on: num_classes must exist right after __init__.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def _instantiate(config: str, *overrides: str) -> _CLI:
    return _CLI(
        _Model,
        L.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=["--data", str(DATA_CONFIGS / config), "--trainer.logger", "false", *overrides],
    )


def test_every_config_is_covered():
    assert sorted(p.name for p in DATA_CONFIGS.glob("*.yaml")) == [
        "cifar10.yaml",
        "cifar100.yaml",
        "digits.yaml",
        "folder.yaml",
        "imagenet.yaml",
    ]


def test_digits_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # keep Trainer side effects out of the repo
    cli = _instantiate("digits.yaml")
    assert type(cli.datamodule) is data.DigitsDataModule
    assert cli.model.num_classes == 10 and cli.datamodule.img_size == 32


@pytest.mark.parametrize(
    ("config", "cls", "num_classes"),
    [
        ("cifar10.yaml", data.CIFAR10DataModule, 10),
        ("cifar100.yaml", data.CIFAR100DataModule, 100),
    ],
)
def test_cifar_configs(cifar_root, monkeypatch, config, cls, num_classes):
    monkeypatch.chdir(cifar_root.path)
    cli = _instantiate(config, "--data.data_dir", str(cifar_root.path))
    assert type(cli.datamodule) is cls and cli.model.num_classes == num_classes
    assert cli.datamodule.mean == cls.default_mean and cli.datamodule.batch_size == 128


@pytest.mark.parametrize(
    ("config", "cls"),
    [("imagenet.yaml", data.ImageNetDataModule), ("folder.yaml", data.ImageFolderDataModule)],
)
def test_folder_configs(jpeg_tree, monkeypatch, config, cls):
    monkeypatch.chdir(jpeg_tree.path)
    cli = _instantiate(config, "--data.data_dir", str(jpeg_tree.path))
    dm = cli.datamodule
    assert type(dm) is cls and cli.model.num_classes == 3
    # The recipe spelled out in the file is the documented default recipe.
    defaults = dict(cls(data_dir=str(jpeg_tree.path)).hparams)
    defaults |= {"mean": dm.default_mean, "std": dm.default_std, "crop_pct": dm.default_crop_pct}
    for key, default in defaults.items():
        if key not in ("batch_size", "num_workers"):
            value = dm.hparams[key]
            assert (tuple(value) if isinstance(value, list) else value) == default, key


def test_config_with_a_missing_dataset_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative data/imagenet does not exist here
    with pytest.raises(ValueError) as info:
        _instantiate("imagenet.yaml")
    # jsonargparse reports it inside its own ValueError; the UserInputError is the cause.
    causes = [info.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    (error,) = [e for e in causes if isinstance(e, UserInputError)]
    assert str(error).startswith("data_dir 'data/imagenet' is not a directory: point --data.")

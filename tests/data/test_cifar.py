"""CIFAR-10/100 datamodules on tiny torchvision-format files (see the `cifar_root` fixture)."""

import pickle

import numpy as np
import pytest
import torch

from refiner_pl.data import CIFAR10DataModule, CIFAR100DataModule
from refiner_pl.errors import UserInputError

CASES = [(CIFAR10DataModule, "cifar10", 10), (CIFAR100DataModule, "cifar100", 100)]


@pytest.mark.parametrize(("cls", "key", "num_classes"), CASES)
def test_splits_classes_and_batches(cifar_root, cls, key, num_classes):
    dm = cls(data_dir=str(cifar_root.path), batch_size=4, num_workers=0)
    assert dm.num_classes == num_classes  # known before setup, for the CLI link
    expected_names = cifar_root.cifar10_classes if key == "cifar10" else cifar_root.cifar100_classes
    assert dm.class_names == expected_names
    assert dm.img_size == 32
    dm.setup("fit")
    assert len(dm.train_set) == cifar_root.train_size
    assert len(dm.val_set) == cifar_root.test_size

    loader = dm.train_dataloader()
    assert len(loader) == cifar_root.train_size // 4
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.int64
    assert ((targets >= 0) & (targets < num_classes)).all()


@pytest.mark.parametrize(("cls", "key", "num_classes"), CASES)
def test_val_batches_are_the_test_split_normalised(cifar_root, cls, key, num_classes):
    dm = cls(data_dir=str(cifar_root.path), batch_size=4, num_workers=0)
    dm.setup("validate")
    images, targets = map(torch.cat, zip(*dm.val_dataloader(), strict=True))
    raw = torch.from_numpy(cifar_root.test_images[key]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    # crop_pct 1.0 at 32px: no resampling, so the batch is exactly the normalised file content.
    torch.testing.assert_close(images, (raw - mean) / std)
    assert targets.tolist() == cifar_root.test_labels[key]


def test_default_normalisation_is_per_dataset(cifar_root):
    c10 = CIFAR10DataModule(data_dir=str(cifar_root.path))
    c100 = CIFAR100DataModule(data_dir=str(cifar_root.path))
    assert c10.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert c100.std == pytest.approx((0.2673, 0.2564, 0.2762))
    custom = CIFAR10DataModule(data_dir=str(cifar_root.path), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.5, 0.5, 0.5)


def test_other_img_size_resizes_both_splits(cifar_root):
    dm = CIFAR10DataModule(data_dir=str(cifar_root.path), img_size=48, batch_size=5, num_workers=0)
    dm.setup("fit")
    train_images, _ = next(iter(dm.train_dataloader()))
    val_images, _ = next(iter(dm.val_dataloader()))
    assert train_images.shape == (5, 3, 48, 48)
    assert val_images.shape == (5, 3, 48, 48)


def test_test_loader_falls_back_to_the_val_split(cifar_root):
    dm = CIFAR100DataModule(data_dir=str(cifar_root.path), batch_size=4, num_workers=0)
    dm.setup("test")
    assert dm.test_set is None
    assert dm.test_dataloader().dataset is dm.val_set
    assert len(dm.test_dataloader()) == 3  # 10 images, incomplete batch kept


def test_fixture_matches_the_real_python2_pickles(cifar_root):
    # Real CIFAR files are Python 2 pickles: byte-string keys unless loaded with latin1.
    path = cifar_root.path / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)
    assert isinstance(entry[b"labels"], list)
    with open(cifar_root.path / "cifar-100-python" / "meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["fine_label_names"][:2] == [
            "apple",
            "aquarium_fish",
        ]


def test_prepare_data_with_download_uses_existing_files_offline(cifar_root):
    dm = CIFAR10DataModule(data_dir=str(cifar_root.path), download=True, num_workers=0)
    dm.prepare_data()  # files pass the md5 check, so torchvision does not download
    dm.setup("fit")
    assert len(dm.train_set) == cifar_root.train_size


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_missing_files_without_download_fail_at_init(tmp_path, cls):
    with pytest.raises(UserInputError, match=r"not found: .* --data\.download true"):
        cls(data_dir=str(tmp_path / "nowhere"))


def test_data_dir_pointing_inside_the_dataset_folder_suggests_the_parent(cifar_root):
    inner = cifar_root.path / "cifar-10-batches-py"
    with pytest.raises(UserInputError, match=r"point --data\.data_dir at its parent"):
        CIFAR10DataModule(data_dir=str(inner))


def test_corrupt_file_is_reported_with_the_fix(cifar_root):
    with open(cifar_root.path / "cifar-10-batches-py" / "test_batch", "ab") as f:
        f.write(b"garbage")
    dm = CIFAR10DataModule(data_dir=str(cifar_root.path), num_workers=0)
    with pytest.raises(UserInputError, match=r"corrupt .* --data\.download true"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size is 0"),
        ({"num_workers": -1}, "num_workers is -1"),
        ({"img_size": 0}, "img_size is 0"),
        ({"hflip": 2.0}, "hflip is 2.0"),
        ({"padding": -1}, "padding is -1"),
        ({"crop_pct": 2.5}, "crop_pct is 2.5"),
        ({"interpolation": "cubic"}, "interpolation 'cubic' is unknown"),
        ({"mean": (0.5, 0.5)}, "mean has 2 values"),
        ({"std": (0.5, 0.0, 0.5)}, "std .* has a value <= 0"),
    ],
)
def test_bad_arguments_fail_at_init(cifar_root, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        CIFAR10DataModule(data_dir=str(cifar_root.path), **kwargs)


def test_hyperparameters_are_saved(cifar_root):
    dm = CIFAR100DataModule(data_dir=str(cifar_root.path), batch_size=8, img_size=40)
    assert dm.hparams["batch_size"] == 8 and dm.hparams["img_size"] == 40
    assert dm.hparams["data_dir"] == str(cifar_root.path) and dm.hparams["download"] is False

"""ImageFolder / ImageNet datamodules on tiny JPEG trees (see `jpeg_tree` in conftest)."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from refiner_pl.data import ImageFolderDataModule, ImageNetDataModule
from refiner_pl.errors import UserInputError

IMAGENET_NAMES = [
    "tench, Tinca tinca",
    "goldfish, Carassius auratus",
    "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
]


def _dm(cls, root, **kwargs):
    kwargs = {"img_size": 64, "batch_size": 4, "num_workers": 0, **kwargs}
    return cls(data_dir=str(root), **kwargs)


def test_imagenet_classes_resolve_from_wnids(jpeg_tree):
    dm = _dm(ImageNetDataModule, jpeg_tree.path)
    assert dm.num_classes == 3  # known before setup, for the CLI link
    assert dm.class_names == IMAGENET_NAMES


def test_imagenet_batches(jpeg_tree):
    dm = _dm(ImageNetDataModule, jpeg_tree.path)
    dm.setup("fit")
    assert len(dm.train_set) == 3 * 4 and len(dm.val_set) == 3 * 2
    assert dm.train_set.classes == jpeg_tree.classes

    train = dm.train_dataloader()
    assert len(train) == 3  # 12 images, batch 4, drop_last
    images, targets = next(iter(train))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and ((targets >= 0) & (targets < 3)).all()

    val_batches = list(dm.val_dataloader())
    assert [len(t) for _, t in val_batches] == [4, 2]  # incomplete batch kept, not shuffled
    assert torch.cat([t for _, t in val_batches]).tolist() == [0, 0, 1, 1, 2, 2]


def test_eval_images_are_normalised_with_the_given_statistics(jpeg_tree):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    dm = _dm(ImageNetDataModule, jpeg_tree.path, mean=mean, std=std, crop_pct=0.9)
    assert dm.mean == mean and dm.std == std
    dm.setup("validate")
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for (path, _), (image, _) in zip(dm.val_set.samples, dm.val_set, strict=True):
        assert image.shape == (3, 64, 64)
        # Solid-colour images (some greyscale, converted to RGB) stay solid after resizing.
        rgb = torch.tensor(jpeg_tree.colors[Path(path)])
        expected = (rgb.view(3, 1, 1) / 255 - m) / s
        torch.testing.assert_close(image, expected.expand_as(image), atol=4 / 255 / 0.2, rtol=0)


def test_default_normalisation_and_crop_are_timm_imagenet_defaults(jpeg_tree):
    dm = _dm(ImageNetDataModule, jpeg_tree.path)
    assert dm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert dm.std == pytest.approx((0.229, 0.224, 0.225))
    assert dm.crop_pct == 0.875


def test_train_transform_is_the_deit_recipe(jpeg_tree):
    text = repr(_dm(ImageNetDataModule, jpeg_tree.path).train_transform)
    assert "RandomResizedCropAndInterpolation" in text and "scale=(0.08, 1.0)" in text
    assert "RandomHorizontalFlip(p=0.5)" in text
    assert "RandAugment(n=2" in text and "m=9, mstd=0.5" in text
    assert "RandomErasing(p=0.25, mode=pixel, count=(1, 1))" in text


def test_test_split_is_used_when_present_else_val(jpeg_tree, make_image_tree):
    dm = _dm(ImageNetDataModule, jpeg_tree.path)
    dm.setup("test")
    assert dm.test_dataloader().dataset is dm.val_set

    make_image_tree(jpeg_tree.path, jpeg_tree.classes, {"test": 1})
    dm = _dm(ImageNetDataModule, jpeg_tree.path)
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 3 and dm.val_set is None


def test_image_folder_uses_folder_names(tmp_path, make_image_tree):
    tree = make_image_tree(
        tmp_path / "pets", ["dog", "cat", "bird"], {"train": 2, "val": 1}, ".png"
    )
    for cls in (ImageFolderDataModule, ImageNetDataModule):  # non-wnid folders: names as-is
        dm = _dm(cls, tree.path, batch_size=2)
        assert dm.class_names == ["bird", "cat", "dog"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3


def test_workers_load_batches(jpeg_tree):
    dm = _dm(ImageFolderDataModule, jpeg_tree.path, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    assert sum(len(t) for _, t in loader) == 12


def test_batch_larger_than_the_train_split_is_rejected(jpeg_tree):
    dm = _dm(ImageNetDataModule, jpeg_tree.path, batch_size=13)
    dm.setup("fit")
    with pytest.raises(UserInputError, match=r"12 images .* lower --data\.batch_size"):
        dm.train_dataloader()


# --- bad input: every check fires in __init__ with the problem and the fix ---


def test_missing_data_dir(tmp_path):
    with pytest.raises(UserInputError, match=r"data_dir '.*nope' is not a directory: point"):
        ImageNetDataModule(data_dir=str(tmp_path / "nope"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagenet_dir_without_a_split(jpeg_tree, split):
    shutil.rmtree(jpeg_tree.path / split)
    with pytest.raises(
        UserInputError,
        match=rf"has no '{split}/' folder: expected the ImageNet layout train/<wnid>/\*\.JPEG",
    ):
        ImageNetDataModule(data_dir=str(jpeg_tree.path))


def test_flat_imagenet_val_folder_gets_the_sorting_hint(jpeg_tree):
    val = jpeg_tree.path / "val"
    shutil.rmtree(val)
    val.mkdir()
    Image.new("RGB", (8, 8)).save(val / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(UserInputError, match=r"images but no class folders: sort .* val/<wnid>/"):
        ImageNetDataModule(data_dir=str(jpeg_tree.path))


def test_split_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(
        UserInputError, match=r"train' has no class folders: expected train/<class>"
    ):
        ImageFolderDataModule(data_dir=str(tmp_path))


def test_class_folder_without_images(jpeg_tree):
    empty = jpeg_tree.path / "train" / "n09999999"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(UserInputError, match=r"class folders without images \(n09999999\)"):
        ImageNetDataModule(data_dir=str(jpeg_tree.path))


def test_val_classes_must_match_train(jpeg_tree):
    shutil.rmtree(jpeg_tree.path / "val" / "n01443537")
    with pytest.raises(UserInputError, match=r"differ from train/'s \(missing: n01443537; "):
        ImageNetDataModule(data_dir=str(jpeg_tree.path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size is 0: it must be >= 1"),
        ({"num_workers": -2}, "num_workers is -2"),
        ({"img_size": 0}, "img_size is 0"),
        ({"auto_augment": "randaug-m9"}, "auto_augment 'randaug-m9' is invalid"),
        ({"train_interpolation": "cubic"}, "train_interpolation 'cubic' is unknown"),
        ({"interpolation": "random"}, "interpolation 'random' is unknown"),
        ({"scale": (1.0, 0.08)}, r"scale \[1.0, 0.08\] is not a range"),
        ({"re_mode": "zeros"}, "re_mode 'zeros' is unknown"),
        ({"re_prob": 1.5}, "re_prob is 1.5"),
        ({"crop_pct": 0.0}, "crop_pct is 0.0"),
    ],
)
def test_bad_arguments_fail_at_init(jpeg_tree, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        _dm(ImageNetDataModule, jpeg_tree.path, **kwargs)


def test_auto_augment_can_be_disabled(jpeg_tree):
    dm = _dm(ImageFolderDataModule, jpeg_tree.path, auto_augment=None, re_prob=0.0)
    text = repr(dm.train_transform)
    assert "RandAugment" not in text and "RandomErasing" not in text
    assert "ColorJitter" in text  # timm applies color_jitter only without auto_augment

"""Predicting on a folder of arbitrary files: decodable images are served, others flagged."""

import pytest
import torch
from torch.utils.data import DataLoader

from refiner_pl.data import DigitsDataModule, ImageFolderDataModule
from refiner_pl.data.predict import ImageFiles, check_predict_dir, collate_predict_items
from refiner_pl.data.transforms import build_eval_transform
from refiner_pl.errors import UserInputError

TRANSFORM = build_eval_transform(32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)


def test_every_mode_and_size_decodes_and_bad_files_are_flagged(mixed_image_folder):
    files = ImageFiles(mixed_image_folder.path, TRANSFORM)
    assert len(files) == len(mixed_image_folder.good) + len(mixed_image_folder.bad)  # no .DS_Store
    batch = collate_predict_items([files[i] for i in range(len(files))])
    assert batch["images"].shape == (len(mixed_image_folder.good), 3, 32, 32)
    assert batch["files"] == mixed_image_folder.good
    failed = dict(batch["failed"])
    assert sorted(failed) == mixed_image_folder.bad
    assert "truncated" in failed["truncated.jpg"]
    assert failed["notes.txt"].startswith("UnidentifiedImageError")


def test_a_batch_of_bad_files_only_has_no_images(mixed_image_folder):
    files = ImageFiles(mixed_image_folder.path, TRANSFORM)
    bad = [files[files.files.index(mixed_image_folder.path / name)] for name in ["notes.txt"]]
    batch = collate_predict_items(bad)
    assert batch["images"] is None and batch["files"] == [] and len(batch["failed"]) == 1


def test_datamodule_predicts_the_folder_with_its_eval_preprocessing(jpeg_tree, mixed_image_folder):
    data = ImageFolderDataModule(
        str(jpeg_tree.path), img_size=32, batch_size=4, num_workers=0,
        predict_dir=str(mixed_image_folder.path),
    )  # fmt: skip
    data.setup("predict")
    assert data.train_set is None and data.val_set is None  # no split is scanned
    batches = list(data.predict_dataloader())
    assert sum(len(b["files"]) for b in batches) == len(mixed_image_folder.good)
    first = ImageFiles(mixed_image_folder.path, data.eval_transform)[0]
    torch.testing.assert_close(batches[0]["images"][0], first.image)


def test_digits_predict_transform_matches_the_digits_scale():
    data = DigitsDataModule(img_size=32, predict_dir=None)
    from PIL import Image

    black = data.predict_transform(Image.new("RGB", (50, 70), (0, 0, 0)))
    assert black.shape == (3, 32, 32)
    # a blank (0) image normalises like a blank digit pixel: (0 - mean) / std
    expected = (0 - data.mean[0]) / data.std[0]
    torch.testing.assert_close(black, torch.full_like(black, expected))


def test_loader_works_with_worker_processes(mixed_image_folder):
    files = ImageFiles(mixed_image_folder.path, TRANSFORM)
    loader = DataLoader(files, batch_size=3, num_workers=2, collate_fn=collate_predict_items)
    batches = list(loader)
    assert sorted(f for b in batches for f, _ in b["failed"]) == mixed_image_folder.bad
    assert sum(len(b["files"]) for b in batches) == len(mixed_image_folder.good)


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_bad_predict_dir_is_refused(tmp_path, kind):
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
        (target / ".hidden").write_text("")
    elif kind == "file":
        target.write_text("")
    with pytest.raises(UserInputError, match="predict_dir"):
        check_predict_dir(str(target))

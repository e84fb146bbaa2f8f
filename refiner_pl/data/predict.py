"""Prediction on a folder of unlabelled images of any size, mode and format PIL reads.

Every file under the folder is tried; one that PIL cannot decode (a text file, a truncated
JPEG) is skipped and reported with the reason instead of stopping the run. Batches are
dicts, ``{"images": Tensor | None, "files": [...], "failed": [(file, reason), ...]}``, so
that the skipped files travel with the batch to the prediction writer, also from worker
processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from refiner_pl.errors import UserInputError

# What PIL raises for a file that is not an image or is damaged (UnidentifiedImageError and
# "image file is truncated" are OSErrors; some decoders raise SyntaxError or ValueError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class PredictItem(NamedTuple):
    image: torch.Tensor | None
    file: str
    error: str | None


def list_files(root: Path) -> list[Path]:
    """Every regular file under `root`, recursively and sorted; hidden files and folders skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder, name) for name in files if not name.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def check_predict_dir(predict_dir: str) -> Path:
    """The folder as a Path, or a UserInputError saying what is wrong with it."""
    root = Path(predict_dir).expanduser()
    if not root.is_dir():
        raise UserInputError(
            f"predict_dir '{predict_dir}' is not a directory: point --data.predict_dir at a "
            "folder of images"
        )
    if not list_files(root):
        raise UserInputError(
            f"predict_dir '{predict_dir}' holds no files: put the images to classify in it"
        )
    return root


class ImageFiles(Dataset):
    """The files under `root` as RGB images through `transform`; undecodable ones flagged.

    Grayscale, palette, CMYK and RGBA images are converted to RGB as in training (the alpha
    channel is dropped). File names in the output are relative to `root`.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.root = Path(root)
        self.files = list_files(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> PredictItem:
        path = self.files[index]
        name = path.relative_to(self.root).as_posix()
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")  # decodes the whole file: damage shows up here
        except DECODE_ERRORS as err:
            return PredictItem(None, name, f"{type(err).__name__}: {err}")
        return PredictItem(self.transform(rgb), name, None)


def collate_predict_items(items: list[PredictItem]) -> dict[str, Any]:
    """Stacks the decoded images of a batch; the others go to ``failed`` with their reason."""
    good = [item for item in items if item.error is None]
    return {
        "images": torch.stack([item.image for item in good]) if good else None,
        "files": [item.file for item in good],
        "failed": [(item.file, item.error) for item in items if item.error is not None],
    }

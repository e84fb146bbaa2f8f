"""Offline quickstart data: scikit-learn's handwritten digits, held in memory as tensors."""

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2

from refiner_pl.data.base import ClassificationDataModule, Split
from refiner_pl.errors import UserInputError

RESIZE_MODES = ("bilinear", "bicubic", "nearest")


class TensorImageDataset(Dataset):
    """In-memory images (N, 1, H, W) in [0, 1] served as normalised 3-channel tensors.

    Storing one channel and expanding per item keeps memory at a third (1797 images at 224px
    are 360 MB as one channel, 1.1 GB as three).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images = images
        self.targets = targets
        self.augment = augment
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            # Before normalising, so the affine fill value 0 is the digits' blank background.
            image = self.augment(image)
        image = (image.expand(3, -1, -1) - self.mean) / self.std
        return image, self.targets[index]


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's 1,797 handwritten 8x8 digits: a real, tiny, offline dataset.

    The images ship inside scikit-learn, so nothing is downloaded. They are upscaled once to
    ``img_size`` (grey replicated to 3 channels), split with a fixed seeded stratified split
    and kept in memory; normalisation defaults to the train split's pixel mean/std. Training
    augmentation is a small random affine (rotation, translation, scale) on tensors; there is
    no horizontal flip since digits are not mirror-symmetric. There is no test split: the test
    loader uses val. There is no centre crop either (the digits fill the frame), hence no
    ``crop_pct``.

    Args:
        data_dir: Unused (the data ships with scikit-learn); accepted for config uniformity.
        img_size: Side length the 8x8 digits are upscaled to.
        num_workers: Dataloader workers; 0 is fastest for this in-memory data.
        val_fraction: Fraction of the images held out (stratified) for validation.
        split_seed: Seed of the train/val split, fixed so runs are comparable.
        augment: Apply the random affine augmentation to training images.
        **kwargs: The rest of `ClassificationDataModule`'s arguments (batch_size, mean and
            std, which default to the train split's pixel statistics, interpolation, which
            is 'bicubic', 'bilinear' or 'nearest' here, repeated_aug, predict_dir, ...).
    """

    # No centre crop: the deployment record and exported metadata say so.
    default_crop_pct: ClassVar[float] = 1.0

    def __init__(
        self,
        data_dir: str | None = None,
        img_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("crop_pct") is not None:
            raise UserInputError(
                "crop_pct does not apply to the digits (they fill the frame, nothing is "
                "cropped): drop data.crop_pct"
            )
        super().__init__(data_dir=data_dir, img_size=img_size, num_workers=num_workers, **kwargs)
        # Stratification needs every one of the 10 classes (~180 images each) in both splits.
        if not 0.05 <= val_fraction <= 0.95:
            raise UserInputError(
                f"val_fraction is {val_fraction}: use a value in [0.05, 0.95], e.g. 0.2"
            )
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = augment
        self._arrays: dict[str, torch.Tensor] | None = None

    def _check_interpolation(self, interpolation: str) -> None:
        """The digits are upscaled with ``F.interpolate``, which knows only these modes."""
        if interpolation not in RESIZE_MODES:
            raise UserInputError(
                f"interpolation '{interpolation}' is unknown here: use one of "
                f"{', '.join(RESIZE_MODES)}"
            )

    @property
    def class_names(self) -> list[str]:
        """The digits "0" to "9"."""
        return [str(d) for d in range(10)]

    @property
    def num_classes(self) -> int:
        """Ten digit classes."""
        return 10

    @property
    def mean(self) -> tuple[float, ...]:
        """Given mean, else the train split's pixel mean (same for the 3 grey channels)."""
        return self._mean if self._mean is not None else self._stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Given std, else the train split's pixel std (same for the 3 grey channels)."""
        return self._std if self._std is not None else self._stats[1]

    @property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        train = self._tensors()["train_images"]
        return (float(train.mean()),) * 3, (float(train.std()),) * 3

    @property
    def predict_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """``predict_dir`` images as the digits are seen: grey, squashed to img_size square.

        The digits are light strokes on a dark ground; dark-on-light scans need inverting.
        """
        return v2.Compose(
            [
                v2.Grayscale(num_output_channels=3),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Resize(
                    (self.img_size, self.img_size),
                    interpolation=v2.InterpolationMode[self.interpolation.upper()],
                    antialias=True,
                ),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Loads, upscales and splits the digits once; later calls reuse the tensors."""
        if self._arrays is None:
            digits = load_digits()
            images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
            extra = {} if self.interpolation == "nearest" else {"align_corners": False}
            size = (self.img_size, self.img_size)
            # Bicubic overshoots slightly; clamping keeps pixels in the [0, 1] intensity range.
            images = F.interpolate(images, size=size, mode=self.interpolation, **extra).clamp_(0, 1)
            targets = torch.from_numpy(digits.target).long()
            train_idx, val_idx = train_test_split(
                np.arange(len(targets)),
                test_size=self.val_fraction,
                stratify=digits.target,
                random_state=self.split_seed,
            )
            train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
            self._arrays = {
                "train_images": images[train_idx].contiguous(),
                "train_targets": targets[train_idx],
                "val_images": images[val_idx].contiguous(),
                "val_targets": targets[val_idx],
            }
        return self._arrays

    def _build_split(self, split: Split) -> Dataset | None:
        if split == "test":
            return None
        arrays = self._tensors()
        augment = None
        if split == "train" and self.augment:
            augment = v2.RandomAffine(
                degrees=10,
                translate=(0.1, 0.1),
                scale=(0.9, 1.1),
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        return TensorImageDataset(
            arrays[f"{split}_images"], arrays[f"{split}_targets"], self.mean, self.std, augment
        )

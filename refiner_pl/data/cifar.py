"""CIFAR-10 / CIFAR-100 on ``torchvision.datasets`` (python pickle version)."""

import pickle
import shutil
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from refiner_pl.data.base import ClassificationDataModule, Split
from refiner_pl.errors import UserInputError, first_line

CIFAR_SIZE = 32  # native resolution; padding is given in pixels at this size


def build_cifar_train_transform(
    img_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    padding: int = 4,
    hflip: float = 0.5,
    interpolation: str = "bicubic",
) -> Callable:
    """The standard CIFAR recipe: pad-and-random-crop plus horizontal flip, at any img_size.

    At img_size != 32 the image is resized first and the padding scales along with it, so the
    augmentation strength stays the same relative to the image.
    """
    steps: list[Callable] = []
    if img_size != CIFAR_SIZE:
        steps.append(
            transforms.Resize(img_size, interpolation=transforms.InterpolationMode(interpolation))
        )
    if padding > 0:
        steps.append(
            transforms.RandomCrop(img_size, padding=round(padding * img_size / CIFAR_SIZE))
        )
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


class _CIFARDataModule(ClassificationDataModule):
    """Shared CIFAR logic; the subclasses only name the torchvision dataset and its statistics.

    CIFAR ships a train and a test split only: the test split serves as the val split (the
    usual CIFAR convention) and the test loader falls back to it.

    Args:
        data_dir: Folder containing the extracted ``cifar-10-batches-py/`` (CIFAR-10) or
            ``cifar-100-python/`` (CIFAR-100), or where to download it.
        download: Download (or extract an existing archive in data_dir) if the files are missing.
        img_size: Square side length of the images the model sees; != 32 resizes.
        hflip: Horizontal flip probability for training.
        padding: Zero padding (in pixels at 32x32) before the random training crop; 0 disables.
        **kwargs: The rest of `ClassificationDataModule`'s arguments (batch_size, mean and
            std, which default to the dataset's channel statistics, crop_pct, which
            defaults to 1.0, the whole image, interpolation, predict_dir, ...).
    """

    dataset_cls: ClassVar[type[CIFAR10]]
    display_name: ClassVar[str]
    _num_classes: ClassVar[int]
    default_crop_pct: ClassVar[float] = 1.0

    def __init__(
        self,
        data_dir: str = "data/cifar",
        download: bool = False,
        img_size: int = CIFAR_SIZE,
        hflip: float = 0.5,
        padding: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, img_size=img_size, **kwargs)
        self.root = Path(data_dir).expanduser()
        self.download = download
        if not download:
            self._check_files()
        if not 0 <= hflip <= 1:
            raise UserInputError(f"hflip is {hflip}: it is a probability, use a value in [0, 1]")
        if padding < 0:
            raise UserInputError(f"padding is {padding}: use >= 0 pixels (0 disables the crop)")
        self.train_transform = build_cifar_train_transform(
            self.img_size,
            mean=self.mean,
            std=self.std,
            padding=padding,
            hflip=hflip,
            interpolation=self.interpolation,
        )

    @property
    def _files(self) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def _check_files(self) -> None:
        """Existence check only; torchvision verifies the md5 sums when loading."""
        folder = self.root / self.dataset_cls.base_folder
        missing = [name for name in self._files if not (folder / name).is_file()]
        if not missing:
            return
        if self.root.name == self.dataset_cls.base_folder:
            fix = f"point --data.data_dir at its parent '{self.root.parent}'"
        else:
            fix = (
                f"pass --data.download true to fetch {self.dataset_cls.filename}, or point "
                f"--data.data_dir at the folder that contains the extracted "
                f"{self.dataset_cls.base_folder}/"
            )
        raise UserInputError(
            f"{self.display_name} not found: '{folder}' lacks {', '.join(missing)}: {fix}"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes, fixed by the dataset (no files needed)."""
        return self._num_classes

    @cached_property
    def class_names(self) -> list[str]:
        """Class names from the dataset's own meta file (available once the files exist)."""
        path = self.root / self.dataset_cls.base_folder / self.dataset_cls.meta["filename"]
        if not check_integrity(str(path), self.dataset_cls.meta["md5"]):
            raise RuntimeError(f"'{path}' is missing or corrupt: call prepare_data() first")
        with open(path, "rb") as f:
            # latin1: the files are Python 2 pickles, as in torchvision's own loader.
            return list(pickle.load(f, encoding="latin1")[self.dataset_cls.meta["key"]])

    def prepare_data(self) -> None:
        """Downloads and extracts the dataset (once per node) when ``download`` is set."""
        if not self.download:
            return
        created = None if self.root.exists() else self.root.absolute()
        while created is not None and not created.parent.exists():
            created = created.parent  # the outermost folder the download creates
        try:
            for train in (True, False):
                self.dataset_cls(str(self.root), train=train, download=True)
        except OSError as err:  # urllib's URLError is one: no network, proxy, DNS
            archive = self.root / self.dataset_cls.filename
            archive.unlink(missing_ok=True)  # a partial download
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise UserInputError(
                f"could not download {self.display_name} ({first_line(err)}): on a machine "
                f"without network, fetch {self.dataset_cls.url} elsewhere, put the file in "
                f"'{self.root}' and rerun with --data.download true, which extracts it"
            ) from None

    def _build_split(self, split: Split) -> Dataset | None:
        if split == "test":
            return None  # the test loader falls back to val (CIFAR's test split)
        train = split == "train"
        try:
            return self.dataset_cls(
                str(self.root),
                train=train,
                transform=self.train_transform if train else self.eval_transform,
            )
        except RuntimeError as err:  # torchvision's md5 check failed
            raise UserInputError(
                f"{self.display_name} in '{self.root}' is corrupt ({err}): delete "
                f"'{self.root / self.dataset_cls.base_folder}' and rerun with --data.download true"
            ) from None


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 train and 10,000 test (used as val) 32x32 images in 10 classes."""

    dataset_cls = CIFAR10
    display_name = "CIFAR-10"
    _num_classes = 10
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 train and 10,000 test (used as val) 32x32 images in 100 classes."""

    dataset_cls = CIFAR100
    display_name = "CIFAR-100"
    _num_classes = 100
    default_mean = (0.5071, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2762)

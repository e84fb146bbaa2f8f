"""LightningDataModules for image classification, one module per dataset family."""

from refiner_pl.data.base import ClassificationDataModule
from refiner_pl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from refiner_pl.data.digits import DigitsDataModule
from refiner_pl.data.folder import ImageFolderDataModule, ImageNetDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
]

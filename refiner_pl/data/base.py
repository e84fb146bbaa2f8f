"""Shared LightningDataModule for image classification.

Subclasses validate their inputs in ``__init__`` (cheap filesystem checks only, so a wrong
config fails before training starts), build datasets in :meth:`_build_split` and inherit the
dataloaders from here.
"""

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import ClassVar, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from refiner_pl.data.predict import ImageFiles, check_predict_dir, collate_predict_items
from refiner_pl.data.resume import ResumableDataLoader, ResumableSampler, SeededSamples
from refiner_pl.data.transforms import build_eval_transform, check_interpolation
from refiner_pl.errors import UserInputError
from refiner_pl.lightning_compat import batches_done_this_epoch
from refiner_pl.seeding import global_seed

Split = Literal["train", "val", "test"]


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


DEFAULT_NUM_WORKERS = min(8, _available_cores())
"""Loader workers per device by default: the cores this process may use, at most 8."""

# Which splits each Trainer stage needs, so e.g. `validate` never scans the train folder.
_STAGE_SPLITS: dict[str | None, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("val",),  # unless predict_dir is set: see setup()
    None: ("train", "val", "test"),
}


def check_triplet(name: str, value: Sequence[float], positive: bool = False) -> tuple[float, ...]:
    """Returns `value` as a 3-tuple of floats or raises UserInputError naming `name`."""
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise UserInputError(
            f"{name} has {len(values)} values {list(values)}: give one per RGB channel, "
            f"e.g. --data.{name} '[0.5, 0.5, 0.5]'"
        )
    if positive and min(values) <= 0:
        raise UserInputError(f"{name} {list(values)} has a value <= 0: every entry must be > 0")
    return values


def stratified_subset(dataset: Dataset, fraction: float, seed: int) -> Subset:
    """`fraction` of every class of `dataset` (at least one image each), drawn with `seed`.

    Per class rather than sklearn's stratified splits, which fail when the part left out has
    fewer images than there are classes (e.g. a fraction of 0.99).
    """
    labels = np.asarray(dataset_targets(dataset))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=count, replace=False))
    return Subset(dataset, np.sort(np.concatenate(keep)).tolist())


def dataset_targets(dataset: Dataset) -> Sequence[int]:
    """The class index of every item, from ``targets`` (torchvision, digits) or a wrapped
    dataset's."""
    while getattr(dataset, "targets", None) is None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise UserInputError(
            f"data.train_fraction needs the class of every train image, but "
            f"{type(dataset).__name__} has no `targets`: use train_fraction 1 with this dataset"
        )
    return targets


class RepeatAugDistributedSampler(RepeatAugSampler, DistributedSampler):
    """timm's `RepeatAugSampler`, declared a `DistributedSampler` so that Lightning keeps it.

    Under a distributed strategy Lightning wraps every sampler that is not a
    `DistributedSampler` in its `DistributedSamplerWrapper` (with ``use_distributed_sampler``,
    the default), which would shard the already sharded indices a second time and send the
    repeats of an image to the same device. Lightning documents the opposite case: "if a
    distributed sampler was already added, Lightning will not replace the existing one" and
    tells them apart with ``isinstance(sampler, DistributedSampler)``. The base class is only
    that marker: every method comes from `RepeatAugSampler` (MRO), which shards by the
    ``num_replicas`` / ``rank`` it is given, and Lightning calls its ``set_epoch`` each epoch.
    The val/test/predict loaders shard without padding (``_eval_sampler``).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, num_repeats: int, shuffle: bool = True
    ) -> None:
        RepeatAugSampler.__init__(
            self,
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            num_repeats=num_repeats,
        )
        # DistributedSampler attributes that RepeatAugSampler does not set.
        self.seed = 0  # RepeatAugSampler seeds its shuffle with the epoch alone
        self.drop_last = False


class ClassificationDataModule(L.LightningDataModule, ABC):
    """Base for image classification datamodules.

    Batches are ``(images, targets)`` with float32 images of shape ``(B, 3, img_size, img_size)``
    normalised by :attr:`mean` / :attr:`std`, and int64 class indices. The train loader
    shuffles and drops the last incomplete batch; val/test loaders do neither. Under
    multi-device strategies the train loader shards by itself (an epoch-seeded
    DistributedSampler, or `RepeatAugDistributedSampler`), so Lightning keeps it;
    val/test/predict loaders shard without padding, so each image is scored exactly once.

    Args:
        data_dir: Dataset root directory.
        img_size: Square side length of the images the model sees.
        batch_size: Batch size per device.
        num_workers: Dataloader worker processes per device (0 loads in the main process).
        pin_memory: Pin host memory for faster host-to-GPU copies (only used when CUDA is
            available).
        persistent_workers: Keep workers alive between epochs (only when num_workers > 0).
        mean: Per-channel normalisation mean; None uses the dataset's default.
        std: Per-channel normalisation std; None uses the dataset's default.
        crop_pct: Eval centre-crop fraction: resize the short side to img_size / crop_pct,
            then centre-crop img_size; None uses the dataset's default.
        interpolation: Resize interpolation for evaluation (and resizing in general).
        repeated_aug: Repeated augmentation (timm's ``RepeatAugSampler``, as in DeiT): every
            train image is drawn this many times per epoch, each copy augmented independently,
            and consecutive copies go to consecutive devices, while an epoch keeps one
            dataset's worth of samples. With at least this many devices every copy lands on
            another device; with fewer, copies share a device and an epoch sees only about
            devices / repeated_aug of the distinct images (a warning says so). 0 or 1
            disables it (DeiT uses 3 on 8+ GPUs).
        predict_dir: Folder of unlabelled images for ``predict`` (any size, any mode and
            format PIL reads; files it cannot decode are skipped and reported). None:
            ``predict`` runs on the val split.
        train_fraction: Train on this fraction of the train split, the same share of every
            class (at least one image each), drawn from the run's seed; val/test stay whole.
            1 uses all of it.
    """

    default_mean: ClassVar[tuple[float, float, float]] = IMAGENET_DEFAULT_MEAN
    default_std: ClassVar[tuple[float, float, float]] = IMAGENET_DEFAULT_STD
    default_crop_pct: ClassVar[float] = DEFAULT_CROP_PCT

    def __init__(
        self,
        data_dir: str | None,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = DEFAULT_NUM_WORKERS,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        crop_pct: float | None = None,
        interpolation: str = "bicubic",
        repeated_aug: int = 0,
        predict_dir: str | None = None,
        train_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserInputError(f"batch_size is {batch_size}: it must be >= 1 (images per device)")
        if num_workers < 0:
            raise UserInputError(
                f"num_workers is {num_workers}: it must be >= 0 (0 loads data in the main process)"
            )
        if img_size < 1:
            raise UserInputError(f"img_size is {img_size}: it must be a positive side length")
        # Above 1 the resized image is smaller than the crop and gets a zero border; the
        # Refiner-ViT-L release evaluates that way (crop_pct 1.13), so up to 2 is accepted.
        if crop_pct is not None and not 0 < crop_pct <= 2:
            raise UserInputError(
                f"crop_pct is {crop_pct}: it must be in (0, 2], e.g. 0.875 (resize 256, crop 224)"
            )
        if repeated_aug < 0:
            raise UserInputError(
                f"repeated_aug is {repeated_aug}: give the number of augmented copies of each "
                "image per epoch (e.g. 3), or 0 to disable it"
            )
        if not 0 < train_fraction <= 1:
            raise UserInputError(
                f"train_fraction is {train_fraction}: use a value in (0, 1], e.g. 0.25 for a "
                "quarter of every class (1 trains on the whole split)"
            )
        self.train_fraction = train_fraction
        self.repeated_aug = repeated_aug
        self.predict_dir = None if predict_dir is None else check_predict_dir(predict_dir)
        self.data_dir = data_dir
        # Public and mutable: Lightning's batch-size finder tunes `datamodule.batch_size`.
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.crop_pct = self.default_crop_pct if crop_pct is None else crop_pct
        self._check_interpolation(interpolation)
        self.interpolation = interpolation
        self._img_size = img_size
        self._mean = None if mean is None else check_triplet("mean", mean)
        self._std = None if std is None else check_triplet("std", std, positive=True)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._built: set[Split] = set()
        # Every init arg of the class chain (subclasses forward the base's through **kwargs),
        # so `load_from_checkpoint` can pass them all back to the concrete class.
        self.save_hyperparameters()

    def _check_interpolation(self, interpolation: str) -> None:
        """Rejects a resize mode this dataset's preprocessing cannot use, in one line."""
        check_interpolation("interpolation", interpolation)

    @property
    def num_classes(self) -> int:
        """Number of classes, known right after ``__init__`` (no ``setup()`` needed)."""
        return len(self.class_names)

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Human-readable class names, indexed by class id."""

    @property
    def img_size(self) -> int:
        """Side length of the square images in every batch."""
        return self._img_size

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean applied to every split."""
        return self.default_mean if self._mean is None else self._mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation std applied to every split."""
        return self.default_std if self._std is None else self._std

    @abstractmethod
    def _build_split(self, split: Split) -> Dataset | None:
        """Returns the dataset for `split`, or None when the dataset has no such split."""

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits `stage` needs (all for None); repeated calls reuse them."""
        if stage == "predict" and self.predict_dir is not None:
            return  # the folder is listed by predict_dataloader(); no dataset split needed
        for split in _STAGE_SPLITS[stage]:
            self._ensure_split(split)
        if stage == "test" and self.test_set is None:
            self._ensure_split("val")  # the test loader falls back to val

    def _ensure_split(self, split: Split) -> None:
        if split not in self._built:
            dataset = self._build_split(split)
            if split == "train" and dataset is not None and self.train_fraction < 1:
                dataset = stratified_subset(dataset, self.train_fraction, global_seed())
            setattr(self, f"{split}_set", dataset)
            self._built.add(split)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped.

        The order is a function of the run's seed and the epoch, each sample's augmentation
        of its own seed, and the first batch of an epoch is the one the fit loop continues
        from: a run resumed from a mid-epoch checkpoint sees exactly the batches the
        interrupted one would have (see `refiner_pl.data.resume`).
        """
        dataset = self._require(self.train_set, "train", "fit")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        indices: DistributedSampler
        if self.repeated_aug > 1:
            indices = RepeatAugDistributedSampler(
                dataset, num_replicas=world_size, rank=rank, num_repeats=self.repeated_aug
            )
            if world_size < self.repeated_aug:
                rank_zero_warn(
                    f"repeated_aug={self.repeated_aug} on {world_size} device(s): copies of an "
                    "image share a device and each epoch sees about "
                    f"{world_size}/{self.repeated_aug} of the distinct images; use it with at "
                    "least as many devices as repeats"
                )
        else:
            # What Lightning injects under DDP, also on one device: an epoch-seeded shuffle.
            indices = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=global_seed()
            )
        # With drop_last, fewer samples than one batch would silently train on nothing.
        per_device = len(indices)
        if per_device < self.batch_size:
            raise UserInputError(
                f"the train split has {len(dataset)} images ({per_device} per device), fewer than "
                f"batch_size {self.batch_size}, so no full batch exists: lower --data.batch_size"
            )
        sampler = ResumableSampler(
            indices, global_seed(), rank, self.batch_size, self._train_batches_done
        )
        return self._loader(SeededSamples(dataset), train=True, sampler=sampler)

    def _train_batches_done(self) -> int:
        """Batches of the current epoch the fit loop has trained (after a mid-epoch resume)."""
        return batches_done_this_epoch(self.trainer) if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        """Validation batches in dataset order."""
        return self._loader(self._require(self.val_set, "val", "validate"), train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches; falls back to the val split when the dataset has no test split."""
        dataset = self.test_set if self.test_set is not None else self.val_set
        return self._loader(self._require(dataset, "test", "test"), train=False)

    @cached_property
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised tensor: resize to img_size / crop_pct, centre-crop, normalise."""
        return build_eval_transform(
            self.img_size,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )

    @property
    def predict_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The preprocessing of ``predict_dir`` images: the eval preprocessing."""
        return self.eval_transform

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_dir`` images, else the val split, in file / dataset order."""
        if self.predict_dir is not None:
            files = ImageFiles(self.predict_dir, self.predict_transform)
            return self._loader(files, train=False, collate_fn=collate_predict_items)
        return self._loader(self._require(self.val_set, "val", "predict"), train=False)

    def _require(self, dataset: Dataset | None, split: str, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"the {split} split is not built: call setup('{stage}') first")
        return dataset

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """Each image on exactly one rank, in order, under a distributed run; else None.

        Lightning's automatic DistributedSampler pads every rank to the same length by
        repeating images, which would count them twice in val/test scores. Lightning's
        `UnrepeatedDistributedSampler` (what it uses for predict) does not pad: a rank may run
        one batch more than another, which evaluation allows, as torchmetrics sums the
        metric states over ranks in compute().
        """
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs or kwargs["num_replicas"] < 2:
            return None
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)

    def _loader(
        self,
        dataset: Dataset,
        train: bool,
        sampler: Sampler | None = None,
        collate_fn: Callable | None = None,
    ) -> DataLoader:
        if not train and sampler is None:
            sampler = self._eval_sampler(dataset)
        # Without a sampler Lightning injects a DistributedSampler (keeping `shuffle`) under DDP.
        loader_class = ResumableDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            # Pinning needs CUDA; on CPU-only hosts torch would only warn about it.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

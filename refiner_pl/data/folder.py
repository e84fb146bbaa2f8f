"""Folder-per-class datasets (``torchvision.datasets.ImageFolder``), ImageNet included."""

import logging
import os
from collections import Counter
from collections.abc import Callable
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import (
    IMG_EXTENSIONS,
    default_loader,
    find_classes,
    has_file_allowed_extension,
)

from refiner_pl.data.base import ClassificationDataModule, Split
from refiner_pl.data.predict import DECODE_ERRORS
from refiner_pl.data.token_label import (
    MissingLabelMaps,
    TokenLabelImageFolder,
    TokenLabelTransform,
)
from refiner_pl.data.transforms import build_train_transform
from refiner_pl.errors import UserInputError

_logger = logging.getLogger(__name__)

BadImages = Literal["error", "skip"]
"""What a training image that cannot be decoded does: stop the run, or skip the image."""


def _has_image(folder: Path) -> bool:
    """Whether `folder` or a sub-folder (ImageFolder searches recursively) holds an image.

    Stops at the first image, so checking all of ImageNet's class folders stays cheap.
    """
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders.append(Path(entry.path))
            elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                return True
    return any(_has_image(sub) for sub in subfolders)


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class ImageFolderDataModule(ClassificationDataModule):
    """Any folder-per-class dataset: ``data_dir/{train,val}/<class>/<image>``, optional ``test/``.

    Class names are the ``train/`` folder names (sorted, as ImageFolder indexes them);
    ``val/`` and ``test/`` must have exactly the same class folders. Without ``test/`` the
    test loader uses ``val/``. Images of any mode are converted to RGB.

    Args:
        data_dir: Root holding ``train/`` and ``val/`` (and optionally ``test/``).
        scale: RandomResizedCrop area range (DeiT: 0.08-1).
        ratio: RandomResizedCrop aspect-ratio range (DeiT: 3/4-4/3).
        hflip: Horizontal flip probability (DeiT: 0.5).
        auto_augment: timm auto-augment policy (DeiT: 'rand-m9-mstd0.5-inc1'); null disables it.
        color_jitter: Colour jitter strength; timm ignores it while auto_augment is set.
        train_interpolation: RandomResizedCrop interpolation; 'random' picks bilinear or
            bicubic per image (timm default).
        re_prob: RandomErasing probability (DeiT: 0.25).
        re_mode: RandomErasing fill: 'pixel' (per-pixel noise, DeiT), 'rand' or 'const'.
        re_count: Maximum number of erased regions per image.
        token_label_dir: Token labelling: folder of per-image label maps in the format LV-ViT
            publishes, ``<token_label_dir>/<class>/<image stem>.pt``; train batches then are
            ``(images, targets, LabelMapCrop)``. None: plain classification.
        missing_label_maps: Images without a label map: ``error`` (at construction),
            ``skip`` them, or ``class_label`` (a map of the image's own class).
        bad_images: A training image that cannot be decoded (damaged, truncated, not an
            image): ``error`` stops with one line naming the file; ``skip`` trains on the next
            image in its place and logs the file with the count so far. Val/test images
            that cannot be decoded are always an error (skipping would change the scores).
        **kwargs: The rest of `ClassificationDataModule`'s arguments (img_size, batch_size,
            mean/std, which default to ImageNet's, crop_pct, which defaults to 0.875,
            interpolation, repeated_aug, predict_dir, train_fraction, ...).
    """

    layout: ClassVar[str] = (
        "expected train/<class>/<image> and val/<class>/<image> (test/ optional)"
    )
    flat_hint: ClassVar[str] = "move the images into one sub-folder per class"

    def __init__(
        self,
        data_dir: str,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        train_interpolation: str = "random",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        token_label_dir: str | None = None,
        missing_label_maps: MissingLabelMaps = "error",
        bad_images: BadImages = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        if bad_images not in get_args(BadImages):
            raise UserInputError(
                f"bad_images={bad_images!r} is unknown: use one of {list(get_args(BadImages))}"
            )
        self.bad_images = bad_images
        self.root = Path(data_dir).expanduser()
        if not self.root.is_dir():
            raise UserInputError(
                f"data_dir '{data_dir}' is not a directory: point --data.data_dir at the dataset "
                f"root; {self.layout}"
            )
        self.has_test_split = (self.root / "test").is_dir()
        self._folders = self._scan_split("train")
        for split in ("val", "test") if self.has_test_split else ("val",):
            folders = self._scan_split(split)
            if folders != self._folders:
                missing = sorted(set(self._folders) - set(folders))
                extra = sorted(set(folders) - set(self._folders))
                raise UserInputError(
                    f"'{self.root / split}' class folders differ from train/'s (missing: "
                    f"{_preview(missing) or 'none'}; not in train/: {_preview(extra) or 'none'}): "
                    f"give {split}/ exactly the class folders of train/"
                )
        # Built here (cheap) so that a bad augmentation setting fails at construction.
        self.train_transform = build_train_transform(
            self.img_size,
            mean=self.mean,
            std=self.std,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            auto_augment=auto_augment,
            color_jitter=color_jitter,
            interpolation=train_interpolation,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
        # Token labelling: the train split carries each image's label map, cut to its crop.
        # Built here, so missing maps are reported before any run starts.
        self.token_label_train_set: TokenLabelImageFolder | None = None
        if token_label_dir is not None:
            self.token_label_train_set = TokenLabelImageFolder(
                self.root / "train",
                token_label_dir,
                TokenLabelTransform.from_timm(self.train_transform),
                missing_label_maps,
                label_map_classes=self.label_map_classes,
            )
            self.token_label_train_set.loader = self._image_loader("train")

    def _scan_split(self, split: Split) -> list[str]:
        """Returns the sorted class folder names of `split`, checking each holds an image."""
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise UserInputError(f"data_dir '{self.root}' has no '{split}/' folder: {self.layout}")
        try:
            # The very function ImageFolder uses, so names and indices agree with it.
            folders, _ = find_classes(str(split_dir))
        except FileNotFoundError:
            with os.scandir(split_dir) as entries:
                flat = any(
                    entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS)
                    for entry in entries
                )
            fix = self.flat_hint if flat else self.layout
            problem = "images but no class folders" if flat else "no class folders"
            raise UserInputError(f"'{split_dir}' has {problem}: {fix}") from None
        if split == "train" and len(folders) < 2:
            raise UserInputError(
                f"'{split_dir}' has {len(folders)} class folder ({_preview(folders)}): a "
                "classifier needs at least 2 classes; add a folder of images per class"
            )
        empty = [name for name in folders if not _has_image(split_dir / name)]
        if empty:
            raise UserInputError(
                f"'{split_dir}' has class folders without images ({_preview(empty)}): add images "
                f"({', '.join(IMG_EXTENSIONS)}) or remove those folders"
            )
        return folders

    @property
    def class_names(self) -> list[str]:
        """The class folder names of ``train/``, in class-index order."""
        return list(self._folders)

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``train/``."""
        return len(self._folders)

    @property
    def label_map_classes(self) -> list[str] | None:
        """Class names the label maps' indices refer to; None: this dataset's own classes."""
        return None

    def _build_split(self, split: Split) -> Dataset | None:
        if split == "test" and not self.has_test_split:
            return None
        if split == "train" and self.token_label_train_set is not None:
            dataset: Dataset = self.token_label_train_set
        else:
            transform = self.train_transform if split == "train" else self.eval_transform
            dataset = ImageFolder(
                str(self.root / split), transform=transform, loader=self._image_loader(split)
            )
        return SkipBadImages(dataset) if split == "train" and self.bad_images == "skip" else dataset

    def _image_loader(self, split: Split) -> Callable[[str], Image.Image]:
        """torchvision's image loader, turning a file it cannot decode into `UndecodableImage`."""
        if split != "train":
            hint = "replace or delete the file (evaluation does not skip images)"
        elif self.bad_images == "skip":
            hint = "skipped (data.bad_images: skip)"
        else:
            hint = "replace or delete the file, or set data.bad_images: skip to train without it"
        return partial(load_image, hint=hint)


class UndecodableImage(UserInputError):
    """An image file that PIL cannot decode."""


def load_image(path: str, hint: str) -> Image.Image:
    """``torchvision``'s `default_loader` (PIL, RGB); a damaged file raises `UndecodableImage`."""
    try:
        return default_loader(path)
    except DECODE_ERRORS as err:
        raise UndecodableImage(
            f"cannot decode image '{path}' ({type(err).__name__}: {err}): {hint}"
        ) from None


class SkipBadImages(Dataset):
    """`dataset` with every image that cannot be decoded replaced by the next one that can.

    Each such file is logged once per process (DataLoader workers are processes), with how
    many were skipped there so far. The batch keeps its size (mixup needs even batches).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        size = len(self)
        for offset in range(size):
            candidate = (index + offset) % size
            if candidate in self.skipped:
                continue
            try:
                return self.dataset[candidate]
            except UndecodableImage as err:
                self.skipped.add(candidate)
                _logger.warning("%s; %d skipped so far in this process", err, len(self.skipped))
        raise UserInputError("no training image can be decoded: check the dataset's files")


@cache
def _imagenet_info() -> ImageNetInfo:
    return ImageNetInfo()


def imagenet_class_names(wnids: list[str]) -> list[str] | None:
    """Maps WordNet ids to timm's ImageNet lemmas ('tench, Tinca tinca'), or None if any is unknown.

    The lemma table covers every ImageNet-22k synset, so subsets of any size resolve. A lemma
    shared by two wnids ('crane' the bird and the machine) gets its wnid appended.
    """
    info = _imagenet_info()
    try:
        names = [info.label_name_to_description(wnid) for wnid in wnids]
    except KeyError:
        return None
    counts = Counter(names)
    return [
        f"{name} ({wnid})" if counts[name] > 1 else name
        for name, wnid in zip(names, wnids, strict=True)
    ]


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet in the folder layout ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

    Any subset of classes works. Class names are the human-readable ImageNet names of the wnid
    folders (via ``timm.data.ImageNetInfo``), or the folder names when they are not all wnids.
    Normalisation and crop_pct default to timm's ImageNet values; the Refiner-ViT release
    recipes override them in ``configs/imagenet``. Arguments as for
    :class:`ImageFolderDataModule`.
    """

    layout: ClassVar[str] = "expected the ImageNet layout train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
    flat_hint: ClassVar[str] = (
        "sort the validation images into val/<wnid>/ folders (e.g. with the widely used "
        "valprep.sh script), giving the layout train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
    )

    @cached_property
    def class_names(self) -> list[str]:
        """ImageNet names of the wnid folders (else the folder names), in class-index order."""
        return imagenet_class_names(self._folders) or list(self._folders)

    @property
    def label_map_classes(self) -> list[str] | None:
        """Published ImageNet label maps index the 1000 wnids: map them onto these folders."""
        wnids = _imagenet_info().label_names()
        return list(wnids) if set(self._folders) <= set(wnids) else None

"""Token labelling data: per-image label maps, crops that remember their box, dense targets.

Label-map format (the one LV-ViT publishes for ImageNet, made by NFNet-F6, and the one its
``generate_label.py`` writes for other datasets): one ``torch.save``'d tensor per training
image, shape ``(2, k, H, W)`` (k = 5 in the release), usually float16:

* ``[0]`` the teacher's top-k class *logits* at each of the H x W map cells, best first;
* ``[1]`` the matching class indices (stored as floats; exact up to 2048 in float16).

The file of ``train/<class>/<name>.JPEG`` is ``<label_dir>/<class>/<name>.pt``. The map is
taken to cover the whole image.

How a dense target is made: the image is cropped and flipped as usual, and the same crop box
(as fractions of the image) is cut out of the label map with RoIAlign and resampled to the
model's G x G patch grid. Before that the top-k logits are scattered into a zero map over all
classes; after it a softmax over classes turns each cell into a distribution (classes outside
a cell's top-k keep logit 0, as in the release).

Why the dataset returns the compact map and not the (G*G, num_classes) target: a dense target
is 196 x 1000 floats (784 kB) per ImageNet sample, versus 2 x 5 x H x W small numbers for
the top-k map plus a 4-number box. :class:`TokenLabelImageFolder` therefore yields
``TokenLabelBatch(image, class_index, LabelMapCrop)`` samples, which the default collate
batches, and `refiner_pl.token_labelling.dense_label_targets` builds the dense targets for
the whole batch on the training device (one scatter and one batched RoIAlign).
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import Tensor
from torchvision import transforms
from torchvision.datasets import ImageFolder

from refiner_pl.data.transforms import build_train_transform
from refiner_pl.errors import UserInputError
from refiner_pl.token_labelling import LabelMapCrop, TokenLabelBatch

__all__ = [
    "CLASS_LABEL_LOGIT",
    "LABEL_MAP_SUFFIX",
    "CropBox",
    "MissingLabelMaps",
    "RandomResizedCropFlip",
    "TokenLabelImageFolder",
    "TokenLabelTransform",
    "build_token_label_transform",
    "label_map_path",
    "load_label_map",
    "save_label_map",
]

_logger = logging.getLogger(__name__)

LABEL_MAP_SUFFIX = ".pt"
MissingLabelMaps = Literal["error", "skip", "class_label"]
# Logit given to an image's own class when it has no label map ("class_label"): after the
# softmax every other class gets exp(-1e4) = 0, so the dense target is exactly one-hot.
# float16 holds it exactly.
CLASS_LABEL_LOGIT = 1e4

CropBox = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)``: left, top, right, bottom as fractions of the image width/height."""


# ----------------------------------------------------------------------------- files
def label_map_path(label_dir: str | Path, image_path: str | Path, image_root: str | Path) -> Path:
    """The label map of ``image_root/<class>/<name>.<ext>``: ``label_dir/<class>/<name>.pt``."""
    relative = Path(os.path.relpath(image_path, image_root))
    return Path(label_dir) / relative.with_suffix(LABEL_MAP_SUFFIX)


def save_label_map(path: str | Path, scores: Tensor, classes: Tensor) -> None:
    """Write a (k, H, W) top-k map in the published format: one (2, k, H, W) float16 tensor."""
    if scores.shape != classes.shape or scores.ndim != 3:
        raise ValueError(
            f"scores {tuple(scores.shape)} and classes {tuple(classes.shape)} must both be "
            "(k, H, W)"
        )
    if classes.numel() and int(classes.max()) > 2048:
        raise ValueError("class indices above 2048 are not exact in float16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack([scores.half(), classes.half()]), path)


def load_label_map(path: str | Path) -> tuple[Tensor, Tensor]:
    """Read a published-format map; returns float32 scores and int64 classes, (k, H, W) each."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Tensor) or data.ndim != 4 or data.shape[0] != 2:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(
            f"label map '{path}' holds {shape}, not a (2, k, H, W) tensor of top-k scores and "
            "class indices: write maps in the LV-ViT format (e.g. with save_label_map)"
        )
    return data[0].float(), data[1].float().round().long()


# ----------------------------------------------------------------------------- transforms
class RandomResizedCropFlip(RandomResizedCropAndInterpolation):
    """timm's random-resized crop, then a horizontal flip with probability ``hflip``.

    Draws exactly as ``RandomResizedCropAndInterpolation`` followed by torchvision's
    ``RandomHorizontalFlip`` do, and also returns the crop box (fractions of the input image,
    before flipping) and whether the crop was flipped.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        hflip: float = 0.5,
    ) -> None:
        super().__init__(size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interpolation)
        self.hflip = hflip

    def __call__(self, img: Image.Image) -> tuple[Image.Image, CropBox, bool]:  # type: ignore[override]
        top, left, height, width = self.get_params(img, self.scale, self.ratio)
        modes = self.interpolation
        mode = random.choice(modes) if isinstance(modes, (list, tuple)) else modes
        out = TF.resized_crop(img, top, left, height, width, list(self.size), mode)
        flipped = bool(torch.rand(1) < self.hflip)
        if flipped:
            out = TF.hflip(out)
        img_w, img_h = img.size
        box = (left / img_w, top / img_h, (left + width) / img_w, (top + height) / img_h)
        return out, box, flipped

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", hflip={self.hflip})"


class TokenLabelTransform:
    """A timm training transform whose crop and flip report their box and flip.

    ``crop_flip`` replaces timm's leading ``RandomResizedCropAndInterpolation`` and
    ``RandomHorizontalFlip``; ``rest`` is everything after them, unchanged (RandAugment or
    colour jitter, to-tensor, normalise, random erasing).
    """

    def __init__(self, crop_flip: RandomResizedCropFlip, rest: Callable[[Image.Image], Tensor]):
        self.crop_flip = crop_flip
        self.rest = rest

    @classmethod
    def from_timm(cls, transform: transforms.Compose) -> TokenLabelTransform:
        """Split a transform made by ``timm.data.create_transform(is_training=True)``."""
        steps = list(getattr(transform, "transforms", []))
        if not steps or type(steps[0]) is not RandomResizedCropAndInterpolation:
            raise ValueError(
                "token labelling needs a timm training transform that starts with "
                f"RandomResizedCropAndInterpolation; got {transform!r}"
            )
        rrc, rest = steps[0], steps[1:]
        hflip = 0.0
        if rest and isinstance(rest[0], transforms.RandomHorizontalFlip):
            hflip, rest = rest[0].p, rest[1:]
        if any(isinstance(t, transforms.RandomVerticalFlip) for t in rest):
            raise ValueError("vertical flips are not carried over to label maps: use vflip=0")
        crop_flip = RandomResizedCropFlip(rrc.size, rrc.scale, rrc.ratio, hflip=hflip)
        crop_flip.interpolation = rrc.interpolation  # timm's resolved mode(s), 'random' included
        return cls(crop_flip, transforms.Compose(rest))

    def __call__(self, img: Image.Image) -> tuple[Tensor, CropBox, bool]:
        img, box, flipped = self.crop_flip(img)
        return self.rest(img), box, flipped

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n    {self.crop_flip!r},\n    {self.rest!r}\n)"


def build_token_label_transform(img_size: int, **kwargs: Any) -> TokenLabelTransform:
    """:func:`~refiner_pl.data.transforms.build_train_transform` (same arguments, same checks),
    with a crop and flip that report their box for the label map."""
    return TokenLabelTransform.from_timm(build_train_transform(img_size, **kwargs))


# ----------------------------------------------------------------------------- dataset
def _missing_files(paths: Sequence[Path]) -> list[int]:
    """Indices of ``paths`` that do not exist; one directory listing per folder, no stat."""
    by_folder: dict[Path, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        by_folder[path.parent].append(i)
    missing = []
    for folder, indices in by_folder.items():
        try:
            present = set(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing.extend(i for i in indices if paths[i].name not in present)
    return sorted(missing)


class TokenLabelImageFolder(ImageFolder):
    """An ImageFolder whose samples are ``(image, class_index, LabelMapCrop)``.

    Every image's label map is looked up at construction (one directory listing per class
    folder). Images without one are handled by ``missing_label_maps``:

    * ``"error"``: raise :class:`UserInputError` naming the count and an example path;
    * ``"skip"``: drop those images (the count is logged);
    * ``"class_label"``: use a map that puts the image's own class everywhere.

    Args:
        root: The split folder, ``<root>/<class>/<image>``.
        label_dir: Folder of label maps, ``<label_dir>/<class>/<image stem>.pt``.
        transform: A :class:`TokenLabelTransform`, or a timm training transform to split.
        missing_label_maps: What to do with images that have no label map.
        label_map_classes: The class names of the label maps' indices, when they differ
            from this dataset's (e.g. the 1000 ImageNet wnids for a subset of ImageNet);
            teacher classes the dataset lacks are dropped. None: the dataset's own classes.
    """

    def __init__(
        self,
        root: str | Path,
        label_dir: str | Path,
        transform: TokenLabelTransform | transforms.Compose,
        missing_label_maps: MissingLabelMaps = "error",
        label_map_classes: Sequence[str] | None = None,
    ) -> None:
        if missing_label_maps not in get_args(MissingLabelMaps):
            raise UserInputError(
                f"missing_label_maps={missing_label_maps!r} is unknown: use one of "
                f"{list(get_args(MissingLabelMaps))}"
            )
        super().__init__(str(root))
        self.label_dir = Path(label_dir).expanduser()
        if not self.label_dir.is_dir():
            raise UserInputError(
                f"token label_dir '{label_dir}' is not a directory: point it at the label maps, "
                "laid out as <label_dir>/<class>/<image stem>.pt"
            )
        if not isinstance(transform, TokenLabelTransform):
            transform = TokenLabelTransform.from_timm(transform)
        self.token_transform = transform
        self.missing_label_maps = missing_label_maps
        self.num_classes = len(self.classes)
        self.class_remap = self._class_remap(label_map_classes)

        paths = [self.label_path(path) for path, _ in self.samples]
        missing = _missing_files(paths)
        if len(missing) == len(paths):
            raise UserInputError(
                f"none of the {len(paths)} images in '{root}' has a label map in "
                f"'{self.label_dir}' (looked for e.g. '{paths[0]}'): check label_dir; maps are "
                "laid out as <label_dir>/<class>/<image stem>.pt"
            )
        missing_set = set(missing)
        first = next(i for i in range(len(paths)) if i not in missing_set)
        self.map_shape = self._check_first_map(paths[first])
        self.class_label_indices: frozenset[int] = frozenset()
        if missing:
            self._handle_missing(missing, paths)

    # ------------------------------------------------------------------ construction
    def _class_remap(self, label_map_classes: Sequence[str] | None) -> Tensor | None:
        if label_map_classes is None:
            return None
        teacher = list(label_map_classes)
        unknown = sorted(set(self.classes) - set(teacher))
        if unknown:
            raise UserInputError(
                f"class folders {unknown[:5]} are not among the {len(teacher)} label_map_classes: "
                "give the class names of the label maps' indices (e.g. the ImageNet wnids)"
            )
        remap = torch.full((len(teacher),), self.num_classes, dtype=torch.long)
        for j, name in enumerate(teacher):
            if name in self.class_to_idx:
                remap[j] = self.class_to_idx[name]
        return remap

    def _check_first_map(self, path: Path) -> tuple[int, int, int]:
        try:
            scores, _ = self._read_map(path)
        except ValueError as err:  # the messages name the problem and the fix
            raise UserInputError(str(err)) from None
        k, height, width = scores.shape
        return k, height, width

    def _handle_missing(self, missing: list[int], paths: list[Path]) -> None:
        count, total, example = len(missing), len(paths), paths[missing[0]]
        if self.missing_label_maps == "error":
            raise UserInputError(
                f"{count} of {total} images have no label map (e.g. '{example}'): generate "
                "them, or set missing_label_maps to 'skip' or 'class_label'"
            )
        if self.missing_label_maps == "skip":
            gone = set(missing)
            self.samples = [s for i, s in enumerate(self.samples) if i not in gone]
            self.imgs = self.samples
            self.targets = [target for _, target in self.samples]
            _logger.warning(
                "Skipping %d of %d images without a label map (e.g. %s)", count, total, example
            )
        else:
            self.class_label_indices = frozenset(missing)
            _logger.warning(
                "%d of %d images have no label map (e.g. %s): using their class label instead",
                count,
                total,
                example,
            )

    # ------------------------------------------------------------------ items
    def label_path(self, image_path: str | Path) -> Path:
        """Where the label map of ``image_path`` (an image under ``root``) lives."""
        return label_map_path(self.label_dir, image_path, self.root)

    def _read_map(self, path: Path) -> tuple[Tensor, Tensor]:
        scores, classes = load_label_map(path)
        if self.class_remap is not None:
            if int(classes.max()) >= len(self.class_remap) or int(classes.min()) < 0:
                raise ValueError(
                    f"label map '{path}' has class indices outside the "
                    f"{len(self.class_remap)} label_map_classes"
                )
            classes = self.class_remap[classes]
        elif int(classes.max()) >= self.num_classes or int(classes.min()) < 0:
            raise ValueError(
                f"label map '{path}' has class index {int(classes.max())} but the dataset has "
                f"{self.num_classes} classes; pass label_map_classes (e.g. the 1000 ImageNet "
                "wnids) so the indices can be mapped"
            )
        return scores, classes

    def __getitem__(self, index: int) -> TokenLabelBatch:  # type: ignore[override]
        path, target = self.samples[index]
        image, (x0, y0, x1, y1), flipped = self.token_transform(self.loader(path))
        if index in self.class_label_indices:
            scores = torch.full(self.map_shape, CLASS_LABEL_LOGIT)
            classes = torch.full(self.map_shape, target, dtype=torch.long)
        else:
            scores, classes = self._read_map(self.label_path(path))
            if tuple(scores.shape) != self.map_shape:
                raise ValueError(
                    f"label map '{self.label_path(path)}' is {tuple(scores.shape)} but the "
                    f"others are {self.map_shape}: all maps must share top-k and size"
                )
        if flipped:  # flip the map and mirror the box: the same as flipping the crop
            scores, classes = scores.flip(-1), classes.flip(-1)
            x0, x1 = 1.0 - x1, 1.0 - x0
        box = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        return TokenLabelBatch(image, torch.tensor(target), LabelMapCrop(scores, classes, box))

"""Train/eval transform builders: thin, validating wrappers around ``timm.data.create_transform``.

The defaults of the ImageFolder/ImageNet datamodules follow the DeiT recipe that Refiner-ViT
trains with: RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) with random bilinear/bicubic
interpolation, horizontal flip 0.5, RandAugment ``rand-m9-mstd0.5-inc1`` and RandomErasing
(p=0.25, per-pixel noise). Mixup/CutMix act on whole batches and belong to the LightningModule.
"""

from collections.abc import Callable, Sequence

from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.transforms import str_to_pil_interp

from refiner_pl.errors import UserInputError

RE_MODES = ("const", "rand", "pixel")


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits giving the black image older Pillow returned.

    ``rand-m9-mstd0.5-inc1`` draws magnitude 10 now and then, which posterize-increasing maps
    to 0 bits; Pillow >= 11 raises on that and would end an ImageNet run after a few hundred
    images, while the Pillow the recipe was tuned with returned a black image.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


_timm_posterize = auto_augment.posterize
for _name, _op in list(auto_augment.NAME_TO_OP.items()):
    if _op is _timm_posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize_keeping_zero_bits


def check_interpolation(name: str, value: str, allow_random: bool = False) -> str:
    """Returns `value` if timm knows the interpolation, else raises UserInputError."""
    try:
        str_to_pil_interp(value)
    except KeyError:
        if not (allow_random and value == "random"):
            choices = "bilinear, bicubic, nearest, lanczos, box, hamming"
            choices += ", random (bilinear or bicubic per image)" if allow_random else ""
            raise UserInputError(f"{name} '{value}' is unknown: use one of {choices}") from None
    return value


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in value]
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise UserInputError(f"{name} {values} is not a range: give [low, high], 0 < low <= high")
    return values[0], values[1]


def _check_prob(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise UserInputError(f"{name} is {value}: it is a probability, use a value in [0, 1]")
    return value


def build_train_transform(
    img_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    interpolation: str = "random",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> Callable:
    """ImageNet-style training transform (RandomResizedCrop + RandAugment + RandomErasing).

    As in timm (and DeiT), ``color_jitter`` is ignored when ``auto_augment`` is set.
    """
    _check_prob("hflip", hflip)
    _check_prob("re_prob", re_prob)
    check_interpolation("train_interpolation", interpolation, allow_random=True)
    if re_mode not in RE_MODES:
        raise UserInputError(f"re_mode '{re_mode}' is unknown: use one of {', '.join(RE_MODES)}")
    if re_count < 1:
        raise UserInputError(f"re_count is {re_count}: use >= 1 (disable erasing with re_prob 0)")
    if color_jitter < 0:
        raise UserInputError(f"color_jitter is {color_jitter}: use >= 0 (0 disables it)")
    scale = _check_range("scale", scale)
    ratio = _check_range("ratio", ratio)
    try:
        return create_transform(
            img_size,
            is_training=True,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            auto_augment=auto_augment or None,
            color_jitter=color_jitter,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
    except (AssertionError, KeyError, ValueError) as err:
        if not auto_augment:
            raise
        # Everything else is checked above; timm parses the policy string here.
        raise UserInputError(
            f"auto_augment '{auto_augment}' is invalid ({err}): use a timm policy such as "
            "'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original' or null to disable it"
        ) from None


def build_eval_transform(
    img_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float,
    interpolation: str = "bicubic",
) -> Callable:
    """Resize the short side to ``img_size / crop_pct``, centre-crop ``img_size``, normalise."""
    check_interpolation("interpolation", interpolation)
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )

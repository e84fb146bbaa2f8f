"""Token-labelling data: label-map files, RoIAlign crops, flips, missing maps, mixing."""

import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader
from torchvision import transforms

from refiner_pl.data.token_label import (
    CLASS_LABEL_LOGIT,
    RandomResizedCropFlip,
    TokenLabelImageFolder,
    TokenLabelTransform,
    build_token_label_transform,
    label_map_path,
    load_label_map,
    save_label_map,
)
from refiner_pl.data.transforms import build_train_transform
from refiner_pl.errors import UserInputError
from refiner_pl.token_labelling import (
    LabelMapCrop,
    TokenLabelMixup,
    crop_label_maps,
    crop_label_target,
    dense_label_targets,
)

MEAN_STD = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # images stay in [0, 1]
PLAIN = {"auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0, **MEAN_STD}


def write_label_maps(
    split_root: Path,
    label_dir: Path,
    classes_of: Callable[[int], Sequence[int]],
    size: int = 6,
    logits: Sequence[float] = (8.0, 2.0),
    skip: Sequence[str] = (),
) -> int:
    """Top-k maps (uniform over the grid) for every image under ``split_root``, as published.

    ``classes_of(class_index)`` gives the k class indices stored for an image of that class.
    """
    folders = sorted(p.name for p in split_root.iterdir() if p.is_dir())
    written = 0
    for image in sorted(split_root.rglob("*.*")):
        if image.name in skip:
            continue
        indices = torch.tensor(classes_of(folders.index(image.parent.name)), dtype=torch.float)
        k = len(indices)
        scores = torch.tensor(logits[:k]).view(k, 1, 1).expand(k, size, size)
        save_label_map(
            label_map_path(label_dir, image, split_root),
            scores,
            indices.view(k, 1, 1).expand(k, size, size),
        )
        written += 1
    return written


def own_then_next(num_classes: int) -> Callable[[int], list[int]]:
    return lambda c: [c, (c + 1) % num_classes]


# ----------------------------------------------------------------------------- format
def test_label_maps_are_written_and_read_in_the_published_format(tmp_path):
    path = label_map_path(
        tmp_path / "maps", "/data/train/n01440764/n01440764_10026.JPEG", "/data/train"
    )
    assert path == tmp_path / "maps" / "n01440764" / "n01440764_10026.pt"

    scores = torch.randn(5, 3, 4)
    classes = torch.randint(0, 1000, (5, 3, 4))
    save_label_map(path, scores, classes)
    raw = torch.load(path, weights_only=True)
    assert raw.shape == (2, 5, 3, 4) and raw.dtype == torch.float16  # [scores, classes]
    assert torch.equal(raw[1].long(), classes)

    loaded_scores, loaded_classes = load_label_map(path)
    assert loaded_scores.dtype == torch.float32 and loaded_classes.dtype == torch.int64
    torch.testing.assert_close(loaded_scores, scores.half().float())
    assert torch.equal(loaded_classes, classes)

    torch.save(torch.zeros(5, 3, 4), path)
    with pytest.raises(ValueError, match=r"not a \(2, k, H, W\) tensor"):
        load_label_map(path)


# ----------------------------------------------------------------------------- RoIAlign
def _position_map(height: int = 8, width: int = 8) -> torch.Tensor:
    """One-class map whose value at cell (row, col) is 10 * row + col."""
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    return (10 * rows + cols)[None, None]


def test_crop_of_the_central_half_picks_exactly_those_cells():
    maps = _position_map()
    out = crop_label_maps(maps, torch.tensor([[0.25, 0.25, 0.75, 0.75]]), 4)
    torch.testing.assert_close(out, maps[:, :, 2:6, 2:6])
    whole = crop_label_maps(maps, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 8)
    torch.testing.assert_close(whole, maps)


def test_crop_matches_bin_centres_of_a_linear_map():
    # Bilinear interpolation and bin averaging keep a linear map linear, so each output cell
    # is the map's value at its bin centre (cell-centre coordinates: cell c sits at c).
    maps = _position_map()
    x0, y0, x1, y1 = 0.125, 0.25, 0.625, 0.875
    gh, gw = 3, 2
    out = crop_label_maps(maps, torch.tensor([[x0, y0, x1, y1]]), (gh, gw))[0, 0]
    expected = torch.empty(gh, gw)
    for i in range(gh):
        for j in range(gw):
            cy = y0 * 8 + (i + 0.5) * (y1 - y0) * 8 / gh - 0.5
            cx = x0 * 8 + (j + 0.5) * (x1 - x0) * 8 / gw - 0.5
            expected[i, j] = 10 * cy + cx
    torch.testing.assert_close(out, expected)
    # Not transposed: moving the box right raises the values by the column step only.
    shifted = crop_label_maps(maps, torch.tensor([[x0 + 0.25, y0, x1 + 0.25, y1]]), (gh, gw))
    torch.testing.assert_close(shifted[0, 0] - out, torch.full((gh, gw), 2.0))


def test_dense_targets_scatter_softmax_and_smoothing_by_hand():
    num_classes = 4
    scores = torch.tensor([[[[3.0, 1.0]], [[-1.0, 2.0]]]])  # (1, k=2, 1, 2)
    # Cell 0: classes 2 (logit 3) and 0 (-1); cell 1: class 1 (1) and 4 = not a dataset class.
    classes = torch.tensor([[[[2, 1]], [[0, 4]]]])
    crops = LabelMapCrop(scores, classes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    dense = dense_label_targets(crops, num_classes, (1, 2))
    assert dense.shape == (1, 2, num_classes)

    def softmax(logits: list[float]) -> list[float]:
        exps = [math.exp(v) for v in logits]
        return [e / sum(exps) for e in exps]

    expected = torch.tensor([softmax([-1.0, 0.0, 3.0, 0.0]), softmax([0.0, 1.0, 0.0, 0.0])])
    torch.testing.assert_close(dense[0], expected)
    smoothed = dense_label_targets(crops, num_classes, (1, 2), smoothing=0.1)
    torch.testing.assert_close(smoothed[0], 0.9 * expected + 0.1 / num_classes)
    torch.testing.assert_close(smoothed.sum(-1), torch.ones(1, 2))

    # The whole-crop target averages the logits over the crop first, then takes the softmax.
    whole = crop_label_target(crops, num_classes)
    torch.testing.assert_close(whole[0], torch.tensor(softmax([-0.5, 0.5, 1.5, 0.0])))


# ----------------------------------------------------------------------------- transforms
def test_crop_flip_draws_like_timm_and_reports_its_box():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    ours = RandomResizedCropFlip(24, scale=(0.2, 1.0), interpolation="bilinear", hflip=0.5)
    timm_rrc = RandomResizedCropAndInterpolation(24, scale=(0.2, 1.0), interpolation="bilinear")
    flip = transforms.RandomHorizontalFlip(0.5)
    flips = set()
    for seed in range(8):
        random.seed(seed)
        torch.manual_seed(seed)
        out, box, flipped = ours(image)
        random.seed(seed)
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(out), np.asarray(flip(timm_rrc(image))))
        random.seed(seed)
        top, left, height, width = timm_rrc.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
        assert box == pytest.approx((left / 70, top / 50, (left + width) / 70, (top + height) / 50))
        flips.add(flipped)
    assert flips == {True, False}


def test_timm_transform_is_split_keeping_the_rest_of_the_pipeline():
    timm_tf = build_train_transform(32, hflip=0.3, re_prob=0.25, **MEAN_STD)
    split = TokenLabelTransform.from_timm(timm_tf)
    assert split.crop_flip.hflip == 0.3
    assert split.crop_flip.interpolation == timm_tf.transforms[0].interpolation  # random pair
    assert [type(t).__name__ for t in split.rest.transforms] == [
        type(t).__name__ for t in timm_tf.transforms[2:]
    ]
    assert {"RandAugment", "Normalize", "RandomErasing"} <= {
        type(t).__name__ for t in split.rest.transforms
    }
    random.seed(0)  # RandAugment draws from python's `random`
    image, box, flipped = split(Image.new("RGB", (40, 30), (200, 10, 10)))
    assert image.shape == (3, 32, 32) and len(box) == 4 and isinstance(flipped, bool)

    with pytest.raises(ValueError, match="RandomResizedCropAndInterpolation"):
        TokenLabelTransform.from_timm(transforms.Compose([transforms.ToTensor()]))
    with_vflip = transforms.Compose([*timm_tf.transforms[:2], transforms.RandomVerticalFlip()])
    with pytest.raises(ValueError, match="vertical flips"):
        TokenLabelTransform.from_timm(with_vflip)


# ----------------------------------------------------------------------------- flips
QUADRANT_COLOURS = torch.tensor(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
)  # top-left, top-right, bottom-left, bottom-right


@pytest.fixture
def quadrant_tree(tmp_path: Path) -> tuple[Path, Path]:
    """Four classes with one 96 x 64 PNG each, coloured by quadrant, and 8 x 8 label maps
    whose class at each cell is that cell's quadrant (logit 20)."""
    root, label_dir = tmp_path / "train", tmp_path / "maps"
    pixels = np.zeros((64, 96, 3), np.uint8)
    for q, colour in enumerate(QUADRANT_COLOURS.numpy() * 255):
        pixels[(q // 2) * 32 : (q // 2 + 1) * 32, (q % 2) * 48 : (q % 2 + 1) * 48] = colour
    quadrant = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    for name in "abcd":
        (root / name).mkdir(parents=True)
        Image.fromarray(pixels).save(root / name / "img.png")
        save_label_map(label_dir / name / "img.pt", torch.full((1, 8, 8), 20.0), quadrant[None])
    return root, label_dir


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_whole_image_crop_flips_image_and_map_together(quadrant_tree, hflip):
    root, label_dir = quadrant_tree
    tf = build_token_label_transform(32, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=hflip, **PLAIN)
    dataset = TokenLabelImageFolder(root, label_dir, tf)
    image, _, crop = dataset[0]
    dense = dense_label_targets(LabelMapCrop(*(t[None] for t in crop)), 4, 4)[0]
    top_left = 1 if hflip else 0  # what the model sees top-left: green when flipped
    torch.testing.assert_close(image[:, 0, 0], QUADRANT_COLOURS[top_left])
    assert dense.argmax(-1).view(4, 4)[0, 0] == top_left
    assert (
        dense.argmax(-1).view(4, 4).tolist()
        == [[top_left, top_left, 1 - top_left, 1 - top_left]] * 2
        + [[top_left + 2, top_left + 2, 3 - top_left, 3 - top_left]] * 2
    )


def test_random_crops_keep_image_and_map_aligned(quadrant_tree):
    root, label_dir = quadrant_tree
    tf = build_token_label_transform(32, scale=(0.1, 1.0), hflip=0.5, **PLAIN)
    dataset = TokenLabelImageFolder(root, label_dir, tf)
    random.seed(0)
    torch.manual_seed(0)
    checked = 0
    for _ in range(12):
        for image, _, crop in dataset:
            dense = dense_label_targets(LabelMapCrop(*(t[None] for t in crop)), 4, 4)[0]
            patches = image.unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, 16, 64)  # (3, token, px)
            for token in range(16):
                pixels = patches[:, token].T  # (64, 3)
                if (pixels - pixels.mean(0)).abs().max() > 0.02:
                    continue  # the patch straddles a quadrant edge
                colour = torch.cdist(pixels.mean(0, keepdim=True), QUADRANT_COLOURS).argmin()
                assert dense[token].argmax() == colour
                checked += 1
    assert checked > 200


# ----------------------------------------------------------------------------- missing maps
def _missing_setup(jpeg_tree, tmp_path, skip=("n01443537_1.JPEG", "n01484850_3.JPEG")):
    root, label_dir = jpeg_tree.path / "train", tmp_path / "maps"
    write_label_maps(root, label_dir, own_then_next(3), skip=skip)
    return root, label_dir, build_token_label_transform(32, **PLAIN)


def test_missing_label_maps_error_names_count_and_example(jpeg_tree, tmp_path):
    root, label_dir, tf = _missing_setup(jpeg_tree, tmp_path)
    with pytest.raises(UserInputError, match=r"2 of 12 images have no label map") as err:
        TokenLabelImageFolder(root, label_dir, tf)
    assert str(label_dir / "n01443537" / "n01443537_1.pt") in str(err.value)
    assert "missing_label_maps" in str(err.value)


def test_missing_label_maps_skip_drops_those_images(jpeg_tree, tmp_path, caplog):
    root, label_dir, tf = _missing_setup(jpeg_tree, tmp_path)
    with caplog.at_level(logging.WARNING, logger="refiner_pl.data.token_label"):
        dataset = TokenLabelImageFolder(root, label_dir, tf, missing_label_maps="skip")
    assert "Skipping 2 of 12 images" in caplog.text
    assert len(dataset) == 10 and len(dataset.targets) == 10
    names = {Path(p).name for p, _ in dataset.samples}
    assert "n01443537_1.JPEG" not in names and "n01484850_3.JPEG" not in names
    assert [t for _, t in dataset.samples] == dataset.targets == [0] * 4 + [1] * 3 + [2] * 3
    for i in range(len(dataset)):
        assert dataset[i][1] == dataset.targets[i]


def test_missing_label_maps_class_label_uses_a_one_hot_map(jpeg_tree, tmp_path):
    root, label_dir, tf = _missing_setup(jpeg_tree, tmp_path)
    dataset = TokenLabelImageFolder(root, label_dir, tf, missing_label_maps="class_label")
    assert len(dataset) == 12
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("n01443537_1.JPEG"))
    _, target, crop = dataset[index]
    assert target == 1 and crop.scores.shape == (2, 6, 6)
    assert (crop.scores == CLASS_LABEL_LOGIT).all() and (crop.classes == 1).all()
    dense = dense_label_targets(LabelMapCrop(*(t[None] for t in crop)), 3, 4)
    assert torch.equal(dense, torch.tensor([0.0, 1.0, 0.0]).expand(1, 16, 3))
    # Images with a map keep theirs: own class logit 8, next class logit 2, the third 0.
    _, target, crop = dataset[0]
    dense = dense_label_targets(LabelMapCrop(*(t[None] for t in crop)), 3, 4)[0]
    torch.testing.assert_close(dense, torch.tensor([8.0, 2.0, 0.0]).softmax(0).expand(16, 3))


def test_bad_label_dirs_and_modes_are_user_errors(jpeg_tree, tmp_path):
    root, label_dir, tf = _missing_setup(jpeg_tree, tmp_path)
    with pytest.raises(UserInputError, match="not a directory"):
        TokenLabelImageFolder(root, tmp_path / "nope", tf)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="none of the 12 images in .* has a label map"):
        TokenLabelImageFolder(root, tmp_path / "empty", tf, missing_label_maps="skip")
    with pytest.raises(UserInputError, match="missing_label_maps='ignore' is unknown"):
        TokenLabelImageFolder(root, label_dir, tf, missing_label_maps="ignore")


def test_teacher_class_indices_are_mapped_to_the_dataset_classes(jpeg_tree, tmp_path):
    root, label_dir = jpeg_tree.path / "train", tmp_path / "maps"
    wnids = jpeg_tree.classes
    teacher = ["n00000001", wnids[2], wnids[0], "n00000002", wnids[1]]  # the maps' index order
    own_in_teacher = {0: 2, 1: 4, 2: 1}
    write_label_maps(root, label_dir, lambda c: [own_in_teacher[c], 3])  # 3: not a dataset class
    tf = build_token_label_transform(32, **PLAIN)
    with pytest.raises(UserInputError, match="pass label_map_classes"):
        TokenLabelImageFolder(root, label_dir, tf)

    dataset = TokenLabelImageFolder(root, label_dir, tf, label_map_classes=teacher)
    loader = DataLoader(dataset, batch_size=12, shuffle=False)
    _, targets, crops = next(iter(loader))
    assert isinstance(crops, LabelMapCrop) and crops.scores.shape == (12, 2, 6, 6)
    dense = dense_label_targets(crops, 3, 4)
    # Own class gets logit 8; the second stored class is not one of ours and is dropped.
    for b, target in enumerate(targets.tolist()):
        logits = torch.zeros(3)
        logits[target] = 8.0
        torch.testing.assert_close(dense[b], logits.softmax(0).expand(16, 3))

    with pytest.raises(UserInputError, match="not among the 2 label_map_classes"):
        TokenLabelImageFolder(root, label_dir, tf, label_map_classes=wnids[:2])


# ----------------------------------------------------------------------------- mixup
@pytest.mark.parametrize("cutmix", [False, True])
def test_mixup_mixes_dense_targets_like_the_pixels(cutmix):
    """Image b is constant b and its tokens' targets one-hot b, so after mixing every token's
    patch mean must equal the class index expected under its dense target."""
    batch, grid, classes = 4, 4, 4
    x = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 32, 32)
    dense = torch.eye(classes)[:, None, :].expand(batch, grid * grid, classes).clone()
    mixup = TokenLabelMixup(
        mixup_alpha=0.0 if cutmix else 1.0,
        cutmix_alpha=1.0 if cutmix else 0.0,
        label_smoothing=0.0,
        num_classes=classes,
    )
    np.random.seed(0)  # for CutMix: a box that covers some patches and cuts through others
    mixed, target, mixed_dense = mixup(x.clone(), torch.arange(batch), dense)
    patch_mean = mixed[:, 0].unfold(1, 8, 8).unfold(2, 8, 8).reshape(batch, 16, 64).mean(-1)
    expected_class = (mixed_dense * torch.arange(classes, dtype=torch.float32)).sum(-1)
    torch.testing.assert_close(patch_mean, expected_class)
    assert not torch.equal(mixed, x)  # something was mixed
    torch.testing.assert_close(mixed_dense.sum(-1), torch.ones(batch, 16))
    # The class target is timm's: the image-area share of each source.
    image_mean = mixed[:, 0].mean((1, 2))
    torch.testing.assert_close(image_mean, (target * torch.arange(classes)).sum(-1))
    if cutmix:
        assert ((mixed_dense[0] > 0) & (mixed_dense[0] < 1)).any(-1).any()  # cut patches blend
        assert (mixed_dense[0].argmax(-1) == 3).any()  # covered patches take sample 3's target

"""Token labelling end to end: label maps on disk -> datamodule -> MixToken + dense loss."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import imagenet_recipe

from refiner_pl.cli import main
from refiner_pl.data import ImageNetDataModule
from refiner_pl.data.token_label import label_map_path, save_label_map
from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier


def write_maps(tree: Path, label_dir: Path, skip: str | None = None) -> None:
    """A 6x6 top-2 map per train image: its own class first, the next class second."""
    folders = sorted(p.name for p in (tree / "train").iterdir())
    for image in sorted((tree / "train").rglob("*.JPEG")):
        if image.name == skip:
            continue
        own = folders.index(image.parent.name)
        classes = torch.tensor([own, (own + 1) % 3], dtype=torch.float).view(2, 1, 1)
        scores = torch.tensor([6.0, 1.0]).view(2, 1, 1)
        path = label_map_path(label_dir, image, tree / "train")
        save_label_map(path, scores.expand(2, 6, 6), classes.expand(2, 6, 6))


def datamodule(tree: Path, label_dir: Path, **kwargs) -> ImageNetDataModule:
    return ImageNetDataModule(
        data_dir=str(tree), token_label_dir=str(label_dir), img_size=32, batch_size=4,
        num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3, **kwargs,
    )  # fmt: skip


def test_token_label_training_steps_are_finite(jpeg_tree, tmp_path):
    label_dir = tmp_path / "labels"
    write_maps(jpeg_tree.path, label_dir)
    data = datamodule(jpeg_tree.path, label_dir)
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=3, img_size=32, mixup_alpha=0.8,
        cutmix_alpha=1.0, attn_similarity_weight=0.1, attn_similarity_pairs=3, warmup_epochs=0,
    )  # fmt: skip
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/dense_loss", "train/attn_similarity", "val/acc1"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/attn_similarity"] > 0
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "aux_head.weight" in changed  # the dense loss trains the token head
    # the penalty reads the maps of the training pass itself: BatchNorm saw 3 batches, not 6
    assert module.model.blocks[1].attn.adapt_bn.num_batches_tracked.item() == 3


def test_attn_similarity_penalty_without_token_labels(jpeg_tree):
    data = ImageNetDataModule(
        data_dir=str(jpeg_tree.path), img_size=32, batch_size=4, num_workers=0
    )
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=3, img_size=32, warmup_epochs=0,
        attn_similarity_weight=0.1, attn_similarity_pairs=3,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["train/attn_similarity"] > 0
    assert module.model.blocks[1].attn.adapt_bn.num_batches_tracked.item() == 2


def test_attn_similarity_pairs_beyond_the_depth_is_refused():
    with pytest.raises(UserInputError, match="refiner_vit_tiny has 4 blocks: use 1 to 3"):
        ImageClassifier(model_name="refiner_vit_tiny", num_classes=3, img_size=32,
                        attn_similarity_weight=0.1, attn_similarity_pairs=4)  # fmt: skip


def test_missing_label_maps_are_reported_at_construction(jpeg_tree, tmp_path):
    label_dir = tmp_path / "labels"
    write_maps(jpeg_tree.path, label_dir, skip="n01443537_1.JPEG")
    with pytest.raises(UserInputError, match="1 of 12 images"):
        datamodule(jpeg_tree.path, label_dir)
    skipping = datamodule(jpeg_tree.path, label_dir, missing_label_maps="skip")
    assert len(skipping.token_label_train_set) == 11


def test_imagenet_config_trains_with_token_labels(jpeg_tree, tmp_path, monkeypatch):
    label_dir = tmp_path / "labels"
    write_maps(jpeg_tree.path, label_dir)
    monkeypatch.chdir(tmp_path)
    main([
        "fit", *imagenet_recipe("refiner_vit_s"),
        "--data.data_dir", str(jpeg_tree.path), "--data.token_label_dir", str(label_dir),
        "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
        "--model.model_name", "refiner_vit_tiny", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
        "--trainer.fast_dev_run", "2",
    ])  # fmt: skip

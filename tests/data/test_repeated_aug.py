"""Repeated augmentation: timm's RepeatAugSampler in the train loader, sharded per device."""

import warnings
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from refiner_pl.data import ImageNetDataModule
from refiner_pl.data.base import RepeatAugDistributedSampler
from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def samplers(n: int, epoch: int, replicas: int = 2) -> list[RepeatAugDistributedSampler]:
    dataset = TensorDataset(torch.arange(n))
    ranks = [
        RepeatAugDistributedSampler(dataset, num_replicas=replicas, rank=rank, num_repeats=3)
        for rank in range(replicas)
    ]
    for sampler in ranks:
        sampler.set_epoch(epoch)
    return ranks


def test_sampler_sends_the_copies_of_an_image_to_both_replicas():
    rank0, rank1 = (list(sampler) for sampler in samplers(12, epoch=5))
    # Together the two devices see one dataset's worth of samples per epoch...
    assert len(rank0) == len(rank1) == 6
    # ...made of 4 images, 3 copies each, every image on both devices (augmented apart).
    counts = Counter(rank0 + rank1)
    assert len(counts) == 4 and set(counts.values()) == {3}
    assert all(image in rank0 and image in rank1 for image in counts)
    # Every rank draws the same permutation for an epoch (seeded by it), another per epoch.
    assert list(samplers(12, epoch=5)[0]) == rank0
    assert list(samplers(12, epoch=6)[0]) != rank0


def datamodule(root, **kwargs) -> ImageNetDataModule:
    defaults = dict(img_size=32, batch_size=2, num_workers=0, repeated_aug=3)
    return ImageNetDataModule(str(root), **{**defaults, **kwargs})


def test_train_loader_shards_by_the_trainers_rank_and_lightning_keeps_it(jpeg_tree):
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched
    loaders = []
    for rank in (0, 1):
        dm = datamodule(jpeg_tree.path)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        loaders.append(dm.train_dataloader())
    for rank, loader in enumerate(loaders):
        sampler = loader.sampler.indices  # the (index, seed) keys come from this order
        assert isinstance(sampler, RepeatAugDistributedSampler)
        assert (sampler.num_replicas, sampler.rank, sampler.num_repeats) == (2, rank, 3)
        assert len(loader) == 3  # 12 images over 2 devices, batches of 2
        # Lightning only injects its DistributedSampler where there is none already.
        assert isinstance(loader.sampler, DistributedSampler)
        assert not ddp._data_connector._requires_distributed_sampler(loader)
    drawn = Counter(index for loader in loaders for index, _ in loader.sampler)
    assert set(drawn.values()) == {3}

    # Without repeats the train loader shards by itself as well (an epoch-seeded shuffle).
    plain = datamodule(jpeg_tree.path, repeated_aug=0)
    plain.setup("fit")
    assert not ddp._data_connector._requires_distributed_sampler(plain.train_dataloader())


def test_lightning_sets_the_sampler_epoch(jpeg_tree):
    class EpochProbe(L.Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[int, int]] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.epochs.append((trainer.current_epoch, trainer.train_dataloader.sampler.epoch))

    probe = EpochProbe()
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=3, img_size=32, model_kwargs={"depth": 1},
        sched="none", drop_path_rate=0.0,
    )  # fmt: skip
    fit = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False, callbacks=[probe],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    fit.fit(module, datamodule=datamodule(jpeg_tree.path, batch_size=4))
    assert probe.epochs == [(0, 0), (1, 1)]
    assert fit.global_step == 6  # 12 samples (one dataset's worth) in batches of 4, per epoch


def test_bad_repeated_aug_values(jpeg_tree):
    with pytest.raises(UserInputError, match="repeated_aug is -1"):
        datamodule(jpeg_tree.path, repeated_aug=-1)
    dm = datamodule(jpeg_tree.path, batch_size=8)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    dm.setup("fit")
    with pytest.raises(UserInputError, match=r"\(6 per device\), fewer than batch_size 8"):
        dm.train_dataloader()


def test_fewer_devices_than_repeats_warns(jpeg_tree):
    dm = datamodule(jpeg_tree.path)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    dm.setup("fit")
    with pytest.warns(UserWarning, match=r"repeated_aug=3 on 2 device\(s\): copies of an image"):
        dm.train_dataloader()
    enough = datamodule(jpeg_tree.path, repeated_aug=2)
    enough.trainer = SimpleNamespace(world_size=2, global_rank=0)
    enough.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough.train_dataloader()

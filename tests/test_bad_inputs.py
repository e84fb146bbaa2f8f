"""The README's bad-input table, through `cli.py` as a user runs it (in this process).

Each case must end with exactly one `error:` line naming the problem and its fix, exit
status 2, no traceback, and nothing written: no run folder, no checkpoint touched.
"""

import re
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from helpers import CONFIGS, QUICKSTART, QUIET, RELEASE_FIXTURE, DigitsWithNaN, run_cli_in_process

from refiner_pl.module import ImageClassifier


def fails_cleanly(tmp_path: Path, *args: str) -> str:
    """The one ``error:`` line of ``cli.py ARGS`` run in `tmp_path`, which holds an earlier
    run's checkpoint that must stay untouched."""
    existing = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"an earlier run's checkpoint")
    line = run_cli_in_process(*args, cwd=tmp_path).error
    assert existing.read_bytes() == b"an earlier run's checkpoint"
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]
    return line


def test_missing_data_dir(tmp_path):
    line = fails_cleanly(
        tmp_path, "fit", "--config", QUICKSTART, "--data", "refiner_pl.data.ImageNetDataModule",
        "--data.data_dir", "no/such/imagenet",
    )  # fmt: skip
    assert "data_dir 'no/such/imagenet' is not a directory" in line


def test_imagenet_dir_without_val(tmp_path, jpeg_tree):
    for image in (jpeg_tree.path / "val").rglob("*"):
        if image.is_file():
            image.unlink()
    for folder in sorted((jpeg_tree.path / "val").rglob("*"), reverse=True):
        folder.rmdir()
    (jpeg_tree.path / "val").rmdir()
    line = fails_cleanly(
        tmp_path, "fit", "--config", QUICKSTART, "--data", "refiner_pl.data.ImageNetDataModule",
        "--data.data_dir", str(jpeg_tree.path),
    )  # fmt: skip
    assert "has no 'val/' folder" in line and "val/<wnid>" in line


def test_img_size_not_divisible_by_patch(tmp_path):
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--data.img_size", "30")
    assert "img_size 30 is not divisible by patch_size 4: use a multiple of 4" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.model_name", "refiner_vit_xl"], "unknown model_name 'refiner_vit_xl'"),
        (["--data.batch_size", "0"], "batch_size is 0: it must be >= 1"),
        (
            ["--model.mixup_alpha", "0.8", "--data.batch_size", "63"],
            "mixup/cutmix need an even batch, but a batch holds 63 images",
        ),
        (["--model.lrr", "0.1"], "lrr"),
    ],
)
def test_model_and_data_arguments(tmp_path, args, expected):
    assert expected in fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, *args)


def test_init_from_that_is_not_a_file(tmp_path):
    line = fails_cleanly(
        tmp_path, "fit", "--config", QUICKSTART, "--model.init_from", "no/such/weights.pth"
    )
    assert "init_from 'no/such/weights.pth' is not a file" in line


def test_predict_dir_that_is_not_a_folder(tmp_path):
    line = fails_cleanly(
        tmp_path, "predict", "--config", QUICKSTART, "--data.predict_dir", "no/such/photos"
    )
    assert "predict_dir 'no/such/photos' is not a directory" in line


# ------------------------------------------------------------------ checkpoints and weights
class _CreatesFile:
    """Unpickling it would create a file: what a malicious checkpoint could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _lightning_checkpoint(path: Path, num_classes: int = 10) -> Path:
    """A checkpoint as `fit` writes it (the parts the CLI reads), of a fresh tiny model."""
    module = ImageClassifier(model_name="refiner_vit_tiny", num_classes=num_classes, img_size=32)
    hparams = {**module.hparams, "_class_path": "refiner_pl.module.ImageClassifier"}
    checkpoint = {
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams,
    }
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("option", ["--ckpt_path", "--model.init_from"])
def test_checkpoint_whose_pickle_would_run_code(tmp_path, option):
    marker, path = tmp_path / "created-by-the-checkpoint", tmp_path / "evil.ckpt"
    payload = {"pytorch-lightning_version": L.__version__, "state_dict": {}}
    torch.save({**payload, "payload": _CreatesFile(str(marker))}, path)
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, option, str(path))
    assert f"refused to load '{path}'" in line and "sources you trust" in line
    assert not marker.exists()


def test_ckpt_path_that_does_not_exist(tmp_path):
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--ckpt_path", "no/such.ckpt")
    assert "ckpt_path 'no/such.ckpt' does not exist" in line


def test_truncated_checkpoint(tmp_path):
    path = _lightning_checkpoint(tmp_path / "cut.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--ckpt_path", str(path))
    assert f"cannot read checkpoint '{path}': the file is truncated" in line


def test_release_weights_given_as_ckpt_path(tmp_path):
    release = str(RELEASE_FIXTURE)
    line = fails_cleanly(tmp_path, "validate", "--config", QUICKSTART, "--ckpt_path", release)
    assert "is not a Lightning checkpoint written by `fit`" in line
    assert "--model.init_from" in line


def test_init_from_weights_of_another_architecture(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)
    path = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), path)
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--model.init_from", str(path))
    assert "does not fit model RefinerViT" in line and "same architecture" in line


def test_checkpoint_of_another_class_count(tmp_path, jpeg_tree):
    path = _lightning_checkpoint(tmp_path / "digits.ckpt", num_classes=10)
    line = fails_cleanly(
        tmp_path, "validate", "--config", QUICKSTART, "--ckpt_path", str(path),
        "--data", "refiner_pl.data.ImageNetDataModule", "--data.data_dir", str(jpeg_tree.path),
    )  # fmt: skip
    assert "trained with num_classes=10 but the datamodule gives num_classes=3" in line
    assert "use the data it was trained on (a dataset with 10 classes)" in line


def test_empty_dataset_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    line = fails_cleanly(
        tmp_path, "fit", "--config", QUICKSTART, "--data", "refiner_pl.data.ImageFolderDataModule",
        "--data.data_dir", str(tmp_path / "empty"),
    )  # fmt: skip
    assert "has no 'train/' folder" in line


# ------------------------------------------------------------- bad data met during training
@pytest.mark.slow
def test_nan_in_the_input(run_cli, tmp_path, monkeypatch):
    # The image that the run's epoch-0 order puts first in batch 5.
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # the quickstart's seed_everything
    data = DigitsWithNaN()
    data.setup("fit")
    nan_index = [index for index, _ in data.train_dataloader().sampler][5 * 64]

    line = run_cli(
        "fit", "--config", QUICKSTART, "--data", "helpers.DigitsWithNaN",
        "--data.nan_index", str(nan_index), "--trainer.max_epochs", "1",
        "--model.warmup_epochs", "0.5", "--step_checkpoint.every_n_train_steps", "2", *QUIET,
    ).error  # fmt: skip
    assert "training stopped: the loss is nan at epoch 0, batch 5 (global step 5)" in line
    # one 3x32x32 image, less the border the random affine fills with zeros
    held = re.search(r"the batch holds (\d+) NaN/inf input values: fix or drop", line)
    assert held and 0 < int(held.group(1)) <= 3 * 32 * 32, line
    # The last good checkpoint (step 4) is kept; nothing was saved after the NaN.
    checkpoints = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.slow
def test_training_image_that_fails_to_decode(run_cli, jpeg_tree):
    broken = sorted((jpeg_tree.path / "train").rglob("*.JPEG"))[4]
    broken.write_bytes(broken.read_bytes()[:100])
    # data.num_workers 1: the error line is the same when a worker process met the file
    line = run_cli(
        "fit", "--config", QUICKSTART, "--data", "refiner_pl.data.ImageNetDataModule",
        "--data.data_dir", str(jpeg_tree.path), "--data.batch_size", "4", "--data.img_size", "32",
        "--data.num_workers", "1", "--trainer.max_epochs", "1", "--model.warmup_epochs", "0.5",
        *QUIET,
    ).error  # fmt: skip
    assert f"cannot decode image '{broken}'" in line
    assert "or set data.bad_images: skip to train without it" in line


# ------------------------------------------------------------ a new user's first hour
def test_cifar_download_without_network(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    # nothing listens on the discard port: refused at once, as on a machine without network
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    line = fails_cleanly(
        tmp_path, "fit", "--config", QUICKSTART, "--data", str(CONFIGS / "data" / "cifar10.yaml"),
        "--data.data_dir", "data/cifar", "--data.download", "true",
    )  # fmt: skip
    assert "could not download CIFAR-10" in line and "put the file in 'data/cifar'" in line
    assert not (tmp_path / "data").exists()  # no empty folder left behind


def test_gpu_config_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu = str(CONFIGS / "trainer" / "gpu_bf16.yaml")
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--trainer", gpu)
    assert "trainer.accelerator 'gpu'" in line and "configs/trainer/cpu.yaml" in line


def test_folder_with_one_class(tmp_path, make_image_tree):
    tree = make_image_tree(tmp_path / "one", ["cats"])
    line = fails_cleanly(
        tmp_path, "fit", "--config", QUICKSTART, "--data", "refiner_pl.data.ImageFolderDataModule",
        "--data.data_dir", str(tree.path),
    )  # fmt: skip
    assert f"'{tree.path / 'train'}' has 1 class folder (cats)" in line
    assert "at least 2 classes" in line


def test_init_from_a_checkpoint_of_another_size(tmp_path):
    wider = timm.create_model("refiner_vit_tiny", num_classes=10, img_size=32, embed_dim=96)
    path = tmp_path / "wider.pth"
    torch.save(wider.state_dict(), path)
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--model.init_from", str(path))
    assert "was trained with another model size: tensor shapes differ" in line
    assert "cls_token [1, 1, 96] vs [1, 1, 64]" in line


def test_truncated_checkpoint_quotes_torch_whole(tmp_path):
    path = _lightning_checkpoint(tmp_path / "cut.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RuntimeError) as raised:
        torch.load(path, weights_only=True, mmap=True)
    first_sentence = re.split(r"(?<=[.!?])\s", " ".join(str(raised.value).split()))[0]
    line = fails_cleanly(tmp_path, "fit", "--config", QUICKSTART, "--ckpt_path", str(path))
    assert f"({first_sentence.rstrip('.')})" in line

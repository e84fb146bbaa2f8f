"""The README's bad-input table, through `cli.py` as a user runs it.

Each case must end with exactly one `error:` line naming the problem and its fix, exit
status 2, no traceback, and nothing written: no run folder, no checkpoint touched.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def fails_cleanly(tmp_path: Path, *args: str) -> str:
    existing = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"an earlier run's checkpoint")
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert existing.read_bytes() == b"an earlier run's checkpoint"
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]
    return errors[0]


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

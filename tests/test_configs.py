"""Every file in configs/ parses and completes a fast_dev_run through the real CLI.

Data files need a dataset on disk: the tests point them at the tiny generated ones. GPU files
run with ``--trainer.accelerator cpu --trainer.devices 1 --trainer.num_nodes 1``; the DDP ones
in a subprocess, so no process group is ever created inside pytest. The FSDP file is the
exception: Lightning runs FSDP on CUDA only (see ``FSDP`` below).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml

from refiner_pl.cli import main
from refiner_pl.models import save_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
FAST = ["--trainer.fast_dev_run", "2", "--trainer.enable_model_summary", "false"]
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]
SMALL_IMAGES = ["--data.img_size", "32", "--data.batch_size", "2", "--data.num_workers", "0"]

DATA = ["data/digits.yaml", "data/cifar10.yaml", "data/cifar100.yaml", "data/folder.yaml",
        "data/imagenet.yaml"]  # fmt: skip
MODELS = ["model/plain_vit_tiny.yaml", "model/refiner_vit_tiny.yaml", "model/refiner_vit_s.yaml",
          "model/refiner_vit_m.yaml", "model/refiner_vit_l.yaml"]  # fmt: skip
TRAINERS = ["trainer/cpu.yaml", "trainer/gpu_bf16.yaml", "trainer/gpu_fp16.yaml",
            "trainer/gpu_bf16_accum8.yaml"]  # fmt: skip
DDP = ["trainer/ddp_bf16.yaml", "trainer/ddp_2x8_bf16.yaml", "imagenet/refiner_vit_s.yaml",
       "imagenet/refiner_vit_m.yaml", "imagenet/refiner_vit_l.yaml",
       "imagenet/finetune_refiner_vit_l_448.yaml"]  # fmt: skip
# Lightning runs FSDP on CUDA only: tests/test_distributed.py builds its strategy instead.
FSDP = ["trainer/fsdp_bf16.yaml"]


def test_every_config_file_is_exercised():
    found = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    assert found == sorted(
        ["quickstart.yaml", "finetune_cifar100.yaml", *DATA, *MODELS, *TRAINERS, *DDP, *FSDP]
    )


def run_in_process(*args: str) -> None:
    try:
        main(["fit", *args])
    except SystemExit as exit_:  # a one-line `error:` from the CLI
        pytest.fail(f"cli exited with {exit_.code}")


def test_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_in_process("--config", QUICKSTART, *FAST)


@pytest.mark.parametrize("config", DATA)
def test_data_config(config, tmp_path, monkeypatch, cifar_root, jpeg_tree):
    monkeypatch.chdir(tmp_path)
    data_dir = {"cifar10": cifar_root.path, "cifar100": cifar_root.path}.get(
        Path(config).stem, jpeg_tree.path
    )
    args = ["--data", str(CONFIGS / config), *SMALL_IMAGES]
    if "digits" not in config:
        args += ["--data.data_dir", str(data_dir)]
    run_in_process("--config", QUICKSTART, *args, *FAST)


@pytest.mark.parametrize("config", MODELS)
def test_model_config(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(CONFIGS / config), "--data.batch_size", "4"]
    run_in_process("--config", QUICKSTART, *model, *FAST)


@pytest.mark.parametrize("config", TRAINERS)
def test_trainer_config(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_in_process("--config", QUICKSTART, "--trainer", str(CONFIGS / config), *ON_CPU, *FAST)


def saved_preset(name: str, path: Path) -> str:
    """A 224 px model file of the preset, to fine-tune from."""
    return str(save_model(timm.create_model(name), path))


def test_cifar100_transfer_config(tmp_path, monkeypatch, cifar_root):
    monkeypatch.chdir(tmp_path)
    init = saved_preset("refiner_vit_s", tmp_path / "s.pt")
    data = ["--data.data_dir", str(cifar_root.path), *SMALL_IMAGES]
    config = ["--config", str(CONFIGS / "finetune_cifar100.yaml"), "--model.init_from", init]
    run_in_process(*config, *data, *ON_CPU, *FAST)


@pytest.mark.slow
@pytest.mark.parametrize("config", DDP)
def test_ddp_config_in_a_subprocess(config, tmp_path, jpeg_tree):
    if config.startswith("imagenet/"):
        args = ["--config", str(CONFIGS / config), "--data.data_dir", str(jpeg_tree.path)]
        args += SMALL_IMAGES
        if "finetune" in config:  # 224 px weights fine-tuned at 32 px: pos_embed resampled
            args += ["--model.init_from", saved_preset("refiner_vit_l", tmp_path / "l.pt")]
    else:
        args = ["--config", QUICKSTART, "--trainer", str(CONFIGS / config)]
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "fit", *args, *ON_CPU, *FAST],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config", ["imagenet/refiner_vit_s.yaml", "imagenet/refiner_vit_l.yaml"])
def test_imagenet_configs_carry_the_release_preprocessing(config):
    data = yaml.safe_load((CONFIGS / config).read_text())["data"]["init_args"]
    assert data["mean"] == data["std"] == [0.5, 0.5, 0.5]
    assert data["interpolation"] == "bicubic"
    assert data["crop_pct"] == {"refiner_vit_s": 0.9, "refiner_vit_l": 1.13}[Path(config).stem]

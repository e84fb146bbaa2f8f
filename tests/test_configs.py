"""Every file in configs/ parses and completes a fast_dev_run through the real CLI.

Data files need a dataset on disk: the tests point them at the tiny generated ones. GPU files
run with ``--trainer.accelerator cpu --trainer.devices 1 --trainer.num_nodes 1``; the DDP ones
launch real ranks in tests/test_distributed.py, so no process group is ever created inside
pytest. The FSDP file is the exception: Lightning runs FSDP on CUDA only (see ``FSDP``
below). The ImageNet presets are overlays of configs/imagenet/base.yaml and always run on
top of it.
"""

from pathlib import Path

import pytest
import timm
import yaml
from helpers import CONFIGS, QUICKSTART, imagenet_recipe, run_cli_subprocess

from refiner_pl.models import save_model

FAST = ["--trainer.fast_dev_run", "2", "--trainer.enable_model_summary", "false"]
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]
SMALL_IMAGES = ["--data.img_size", "32", "--data.batch_size", "2", "--data.num_workers", "0"]

DATA = ["data/digits.yaml", "data/cifar10.yaml", "data/cifar100.yaml", "data/folder.yaml",
        "data/imagenet.yaml"]  # fmt: skip
MODELS = ["model/plain_vit_tiny.yaml", "model/refiner_vit_tiny.yaml", "model/refiner_vit_s.yaml",
          "model/refiner_vit_m.yaml", "model/refiner_vit_l.yaml"]  # fmt: skip
TRAINERS = ["trainer/cpu.yaml", "trainer/gpu_bf16.yaml", "trainer/gpu_fp16.yaml",
            "trainer/gpu_bf16_accum8.yaml"]  # fmt: skip
DDP = ["trainer/ddp_bf16.yaml", "trainer/ddp_2x8_bf16.yaml"]  # see tests/test_distributed.py
IMAGENET = ["refiner_vit_s", "refiner_vit_m", "refiner_vit_l", "finetune_refiner_vit_l_448"]
# Lightning runs FSDP on CUDA only: tests/test_distributed.py builds its strategy instead.
FSDP = ["trainer/fsdp_bf16.yaml"]


def test_every_config_file_is_exercised():
    found = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    imagenet = ["imagenet/base.yaml", *(f"imagenet/{preset}.yaml" for preset in IMAGENET)]
    assert found == sorted(
        ["quickstart.yaml", "finetune_cifar100.yaml", *DATA, *MODELS, *TRAINERS, *DDP, *FSDP]
        + imagenet
    )


@pytest.fixture
def run_in_process(run_cli):
    """``cli.py fit ARGS`` in this process, in the test's tmp_path; it must succeed."""

    def run(*args: str) -> None:
        run_cli("fit", *args).check()

    return run


def test_quickstart(run_in_process):
    run_in_process("--config", QUICKSTART, *FAST)


@pytest.mark.parametrize("config", DATA)
def test_data_config(config, run_in_process, cifar_root, jpeg_tree):
    data_dir = {"cifar10": cifar_root.path, "cifar100": cifar_root.path}.get(
        Path(config).stem, jpeg_tree.path
    )
    args = ["--data", str(CONFIGS / config), *SMALL_IMAGES]
    if "digits" not in config:
        args += ["--data.data_dir", str(data_dir)]
    run_in_process("--config", QUICKSTART, *args, *FAST)


SLOW = pytest.mark.slow


# M and L are slow: building 55-81 M parameters takes seconds
@pytest.mark.parametrize(
    "config",
    [pytest.param(c, marks=SLOW) if c.endswith(("_m.yaml", "_l.yaml")) else c for c in MODELS],
)
def test_model_config(config, run_in_process):
    model = ["--model", str(CONFIGS / config), "--data.batch_size", "4"]
    run_in_process("--config", QUICKSTART, *model, *FAST)


# mixed precision on the CPU (bf16 autocast) is slow: the GPU files are slow tests
@pytest.mark.parametrize(
    "config", [c if "cpu" in c else pytest.param(c, marks=SLOW) for c in TRAINERS]
)
def test_trainer_config(config, run_in_process):
    trainer = ["--trainer", str(CONFIGS / config), *ON_CPU, "--data.batch_size", "8"]
    run_in_process("--config", QUICKSTART, *trainer, *FAST)


def saved_preset(name: str, path: Path) -> str:
    """A 224 px model file of the preset, to fine-tune from."""
    return str(save_model(timm.create_model(name), path))


# slow: builds, saves and fine-tunes refiner_vit_s (~6 s)
@pytest.mark.slow
def test_cifar100_transfer_config(run_in_process, tmp_path, cifar_root):
    init = saved_preset("refiner_vit_s", tmp_path / "s.pt")
    data = ["--data.data_dir", str(cifar_root.path), *SMALL_IMAGES]
    config = ["--config", str(CONFIGS / "finetune_cifar100.yaml"), "--model.init_from", init]
    run_in_process(*config, *data, *ON_CPU, *FAST)


def imagenet_args(preset: str, tmp_path: Path, data_dir: Path) -> list[str]:
    args = [*imagenet_recipe(preset), "--data.data_dir", str(data_dir), *SMALL_IMAGES]
    if "finetune" in preset:  # 224 px weights fine-tuned at 32 px: pos_embed resampled
        args += ["--model.init_from", saved_preset("refiner_vit_l", tmp_path / "l.pt")]
    return args


# The ImageNet recipe's DDP strategy as written in base.yaml runs with one preset; the other
# presets only change the model and data, and run in this process on the default strategy.
# The DDP trainer files launch real ranks in tests/test_distributed.py: ddp_bf16.yaml in its
# 2-process fit, ddp_2x8_bf16.yaml in the torchrun test.
@pytest.mark.slow
def test_imagenet_recipe_ddp_in_a_subprocess(tmp_path, jpeg_tree):
    args = imagenet_args("refiner_vit_s", tmp_path, jpeg_tree.path)
    run_cli_subprocess("fit", *args, *ON_CPU, *FAST, cwd=tmp_path).check()


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in IMAGENET if p != "refiner_vit_s"])
def test_imagenet_preset(preset, run_in_process, tmp_path, jpeg_tree):
    args = imagenet_args(preset, tmp_path, jpeg_tree.path)
    run_in_process(*args, *ON_CPU, "--trainer.strategy", "auto", *FAST)


# The release's preprocessing: [-1, 1] inputs, bicubic, and each model's own eval crop.
@pytest.mark.parametrize(
    ("preset", "model_name", "crop_pct", "img_size"),
    [
        ("refiner_vit_s", "refiner_vit_s", 0.9, 224),
        ("refiner_vit_m", "refiner_vit_m", 1.0, 224),
        ("refiner_vit_l", "refiner_vit_l", 1.13, 224),
        ("finetune_refiner_vit_l_448", "refiner_vit_l", 1.13, 448),
    ],
)
def test_imagenet_presets_compose_with_the_base(run_cli, preset, model_name, crop_pct, img_size):
    printed = run_cli("fit", *imagenet_recipe(preset), "--print_config").check().stdout
    config = yaml.safe_load(printed)
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert config["data"]["class_path"] == "refiner_pl.data.ImageNetDataModule"
    assert data["mean"] == data["std"] == [0.5, 0.5, 0.5]
    assert data["interpolation"] == "bicubic"
    assert (data["crop_pct"], data["img_size"]) == (crop_pct, img_size)
    assert model["model_name"] == model_name
    # the run folder is the preset's; the base's logger settings stay
    logger = config["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert logger["init_args"]["name"].endswith(preset)
    assert logger["init_args"]["save_dir"] == "runs"
    assert config["ema"]["class_path"] == "refiner_pl.callbacks.EMA"


ONE_EPOCH = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.enable_model_summary", "false",
    "--trainer.strategy", "auto", "--trainer.precision", "32-true",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["finetune_cifar100", "imagenet/refiner_vit_s"])
def test_a_recipe_runs_for_one_epoch(recipe, run_cli, tmp_path, cifar_root, jpeg_tree):
    """A smoke run of a recipe whose warmup (and cool-down) outlast it: the schedule shrinks
    to fit, with one warning line, instead of refusing to start."""
    if recipe == "finetune_cifar100":
        init = saved_preset("refiner_vit_s", tmp_path / "s.pt")
        args = ["--config", str(CONFIGS / "finetune_cifar100.yaml"), "--model.init_from", init,
                "--data.data_dir", str(cifar_root.path)]  # fmt: skip
    else:
        args = [*imagenet_recipe(Path(recipe).name), "--data.data_dir", str(jpeg_tree.path)]
    result = run_cli("fit", *args, *SMALL_IMAGES, *ON_CPU, *ONE_EPOCH).check()
    warnings = [line for line in result.stderr.splitlines() if "do not fit in this" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: warmup_epochs")
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in result.stderr

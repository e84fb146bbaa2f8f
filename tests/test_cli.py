"""cli.py end to end, as a user runs it, in this process (`run_cli`) in a fresh folder."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, QUICKSTART, QUIET, SHORT, logged_metric

ONE_BATCH = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", *QUIET]


# ------------------------------------------------------------------------ configuration
def test_print_config_round_trips(run_cli, tmp_path):
    first = run_cli("fit", "--config", QUICKSTART, "--print_config").check()
    printed = tmp_path / "printed.yaml"
    printed.write_text(first.stdout)

    config = yaml.safe_load(first.stdout)
    assert config["seed_everything"] == 42
    assert config["model"]["class_path"] == "refiner_pl.module.ImageClassifier"
    assert config["model"]["init_args"]["model_name"] == "refiner_vit_tiny"
    assert "num_classes" not in config["model"]["init_args"]  # linked from the datamodule
    assert config["data"]["class_path"] == "refiner_pl.data.DigitsDataModule"
    assert config["checkpoint"]["monitor"] == "val/acc1"
    assert config["lr_monitor"]["logging_interval"] == "step"

    second = run_cli("fit", "--config", str(printed), "--print_config").check()
    assert second.stdout == first.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "name", ["refiner_vit_tiny", "refiner_vit_s", "refiner_vit_m", "refiner_vit_l"]
)
def test_preset_configs_compose(name, run_cli):
    # print_config only parses (tests/test_configs.py trains each file)
    result = run_cli(
        "fit",
        *("--trainer", str(CONFIGS / "trainer/cpu.yaml")),
        *("--model", str(CONFIGS / f"model/{name}.yaml")),
        *("--data", str(CONFIGS / "data/digits.yaml")),
        "--print_config",
    ).check()
    assert yaml.safe_load(result.stdout)["model"]["init_args"]["model_name"] == name


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"trainer": {"max_epochz": 3}}, "max_epochz"),
        ({"model": {"init_args": {"lrr": 0.1}}}, "lrr"),
        ({"checkpoint": {"monitr": "val/loss"}}, "monitr"),
    ],
)
def test_unknown_config_key_is_one_line_error(run_cli, tmp_path, config, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = run_cli("fit", "--config", QUICKSTART, "--config", str(bad))
    assert key in result.error
    assert result.stderr.count("\n") == 1, result.stderr  # no usage dump, nothing else


def test_bad_value_names_the_key(run_cli):
    line = run_cli("fit", "--config", QUICKSTART, "--model.sched", "cosin").error
    assert "model.sched" in line and "cosin" in line


def _assert_untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "the run must not write anything"


def test_batch_size_zero_fails_before_training(run_cli, tmp_path):
    result = run_cli("fit", "--config", QUICKSTART, "--data.batch_size", "0")
    assert result.error == "error: batch_size is 0: it must be >= 1 (images per device)"
    _assert_untouched(tmp_path)


def test_unknown_model_name_fails_before_training(run_cli, tmp_path):
    line = run_cli("fit", "--config", QUICKSTART, "--model.model_name", "refiner_vit_xs").error
    assert "refiner_vit_xs" in line and "refiner_vit_s" in line
    _assert_untouched(tmp_path)


def test_best_without_any_run_is_one_line_error(run_cli):
    line = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", "best").error
    assert "ckpt_path 'best'" in line and "runs/quickstart" in line


# ------------------------------------------------------------------------ real runs
def test_quickstart_fast_dev_run(run_cli, tmp_path):
    result = run_cli("fit", "--config", QUICKSTART, "--trainer.fast_dev_run", "true", *QUIET)
    result.check()
    assert "`Trainer.fit` stopped" in result.stderr + result.stdout
    _assert_untouched(tmp_path)  # fast_dev_run logs and checkpoints nothing


@pytest.mark.slow
def test_fit_then_validate_best_then_resume_last(run_cli, tmp_path):
    run_cli("fit", "--config", QUICKSTART, "--trainer.max_epochs", "2", *SHORT).check()
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "hparams.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and len(ckpts) == 2, ckpts
    [best_name] = [name for name in ckpts if name != "last.ckpt"]
    assert re.fullmatch(r"epoch=[01]-val_acc1=\d\.\d{4}\.ckpt", best_name)

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1  # the latest epoch, whichever was best
    [best_state] = [s for k, s in last["callbacks"].items() if "'val/acc1'" in k]
    best_score = float(best_state["best_model_score"])

    validate = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", "best", *QUIET).check()
    assert f"ckpt_path 'best': runs/quickstart/version_0/checkpoints/{best_name}" in validate.stderr
    assert logged_metric(validate.stdout, "val/acc1") == pytest.approx(best_score, abs=1e-6)
    assert f"val_acc1={logged_metric(validate.stdout, 'val/acc1'):.4f}" in best_name

    # The checkpoint fixes the data shape: another img_size is a one-line error.
    args = ("validate", "--config", QUICKSTART, "--ckpt_path", "best", "--data.img_size", "48")
    line = run_cli(*args).error
    assert "data.img_size=48 (checkpoint: 32)" in line

    # Resuming continues the same run folder, from the latest epoch, with the checkpoint's
    # hyperparameters (a warning names the given values they replace).
    resume = run_cli(
        *("fit", "--config", QUICKSTART, "--trainer.max_epochs", "3", *SHORT),
        *("--ckpt_path", "last", "--model.lr", "0.01"),
    ).check()
    assert "Restored all states" in resume.stderr
    assert "model.lr=0.01 -> 0.002" in resume.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2
    other_runs = [p for p in (tmp_path / "runs" / "quickstart").iterdir() if p != run]
    assert not any((p / "checkpoints").exists() for p in other_runs)

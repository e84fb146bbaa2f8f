"""Run folders and checkpoint aliases (`refiner_pl.runs`): `best`/`last` never pick another
config's run, evaluation writes beside the checkpoint, `fit` says where its outputs are."""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import pytest
import torch
from helpers import QUICKSTART, QUIET, run_cli_in_process

from refiner_pl.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from refiner_pl.export import main as export_main
from refiner_pl.module import ImageClassifier
from refiner_pl.runs import TRAINING_ONLY_DATA_KEYS, TRAINING_ONLY_MODEL_KEYS

TINY = [
    "--config", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "3",
    "--precise_bn.num_batches", "2", *QUIET,
]  # fmt: skip


@dataclass
class TwoRuns:
    folder: Path  # the working directory of the runs
    long: Path
    smoke: Path
    other: Path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> TwoRuns:
    """A longer run (10 train batches) and then a smoke run (2 batches) of one config, and a
    run of other data (16 px images) after them, in one runs folder (shared: the tests only
    evaluate them, which takes no new version)."""
    folder = tmp_path_factory.mktemp("two_runs")
    for extra in (["10"], ["2"], ["2", "--data.init_args.img_size", "16"]):
        args = ("fit", *TINY, "--trainer.limit_train_batches", *extra)
        run_cli_in_process(*args, cwd=folder).check()
    root = folder / "runs" / "quickstart"
    return TwoRuns(folder, *(root / f"version_{n}" for n in range(3)))


def _best_score(run: Path) -> float:
    return float(next((run / "checkpoints").glob("epoch=*")).stem.split("val_acc1=")[1])


def test_best_is_the_best_of_all_runs_of_the_config(run_cli, two_runs):
    assert _best_score(two_runs.long) > _best_score(two_runs.smoke)
    best = ("validate", "--config", QUICKSTART, "--ckpt_path", "best", *QUIET)
    result = run_cli(*best, cwd=two_runs.folder).check()
    chosen = next((two_runs.long / "checkpoints").glob("epoch=*"))
    assert f"ckpt_path 'best': {chosen.relative_to(two_runs.folder)}" in result.stderr
    assert "(run runs/quickstart/version_0, val/acc1" in result.stderr
    # the run of other data is never used, and the line names what differs
    assert "skipped run runs/quickstart/version_2: data.img_size=32 (checkpoint: 16)" in (
        result.stderr
    )
    # results beside the checkpoint; no new training version
    results = two_runs.long / "validate" / chosen.stem / "validate_results.json"
    assert results.is_file()
    assert sorted(p.name for p in two_runs.long.parent.iterdir()) == [
        "version_0", "version_1", "version_2",
    ]  # fmt: skip

    # Another recipe or augmentation does not make another network: the same file is chosen.
    result = run_cli(
        *best, "--model.init_args.lr", "0.5", "--model.init_args.warmup_epochs", "3",
        "--data.init_args.augment", "false", "--data.init_args.batch_size", "32",
        cwd=two_runs.folder,
    ).check()  # fmt: skip
    assert f"ckpt_path 'best': {chosen.relative_to(two_runs.folder)}" in result.stderr


def test_last_is_the_newest_run_of_the_config(run_cli, two_runs):
    last = ("validate", "--config", QUICKSTART, "--ckpt_path", "last", *QUIET)
    result = run_cli(*last, cwd=two_runs.folder).check()
    assert "version_1/checkpoints/last.ckpt (run runs/quickstart/version_1, epoch 0" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("cls", "compared"),
    [
        (ImageClassifier, {"model_name", "model_kwargs"}),
        (DigitsDataModule, {"data_dir", "img_size", "mean", "std", "crop_pct", "interpolation",
                            "val_fraction", "split_seed"}),
        (CIFAR10DataModule, {"data_dir", "img_size", "mean", "std", "crop_pct", "interpolation"}),
        (ImageFolderDataModule, {"data_dir", "img_size", "mean", "std", "crop_pct",
                                 "interpolation"}),
    ],
)  # fmt: skip
def test_every_setting_is_either_compared_or_training_only(cls, compared):
    """A new init argument must be placed: does it change the network or the scored data?"""
    ignored = TRAINING_ONLY_MODEL_KEYS if cls is ImageClassifier else TRAINING_ONLY_DATA_KEYS
    names = set()
    for klass in cls.__mro__:  # the datamodules take the base's arguments through **kwargs
        if "__init__" in vars(klass) and klass.__module__.startswith("refiner_pl"):
            names |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    assert names - ignored == compared


def test_no_run_of_the_config_is_one_line(run_cli, tmp_path):
    run_cli("fit", *TINY, "--trainer.limit_train_batches", "2", "--data.init_args.img_size", "16")
    result = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", "best", *QUIET)
    assert "no run in runs/quickstart/*/checkpoints was trained with this model and data" in (
        result.error
    )
    assert "data.img_size=32 (checkpoint: 16)" in result.error


def test_fit_names_its_outputs_and_max_epochs_1_works(run_cli, tmp_path):
    # The quickstart's warmup (1 epoch) fills a 1-epoch run: shortened, with one warning.
    result = run_cli(
        "fit", "--config", QUICKSTART, "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2", *QUIET,
    ).check()  # fmt: skip
    warnings = [line for line in result.stderr.splitlines() if "warmup_epochs" in line]
    assert len(warnings) == 1 and "shortened to 2 steps" in warnings[0]
    run = Path("runs/quickstart/version_0")
    best = next((tmp_path / run / "checkpoints").glob("epoch=*"))
    assert f"run folder: {run}" in result.stderr
    assert f"best checkpoint: {run}/checkpoints/{best.name} (val/acc1 " in result.stderr
    assert f"last checkpoint: {run}/checkpoints/last.ckpt" in result.stderr
    assert "Tip:" not in result.stderr


# slow: a fit, then an ONNX export (~11 s)
@pytest.mark.slow
def test_export_of_best_carries_deployment_metadata(run_cli, tmp_path, monkeypatch, capsys):
    run_cli("fit", *TINY, "--trainer.limit_train_batches", "2").check()
    out = tmp_path / "model.onnx"
    monkeypatch.chdir(tmp_path)
    export_main(["--ckpt_path", "best", "--train_config", QUICKSTART, "--out", str(out)])
    assert "runs/quickstart/version_0/checkpoints/epoch=0" in capsys.readouterr().err
    metadata = onnxruntime.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert metadata["class_names"] == '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'
    assert metadata["input_size"] == "[3, 32, 32]"
    digits = DigitsDataModule()
    assert json.loads(metadata["mean"]) == pytest.approx(list(digits.mean))
    assert json.loads(metadata["std"]) == pytest.approx(list(digits.std))
    assert metadata["interpolation"] == '"bicubic"' and metadata["num_classes"] == "10"


def test_evaluation_of_a_checkpoint_outside_a_run_folder(run_cli, tmp_path):
    run_cli("fit", *TINY, "--trainer.limit_train_batches", "2").check()
    loose = tmp_path / "elsewhere" / "model.ckpt"
    loose.parent.mkdir()
    shutil.copy(tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt", loose)
    run_cli("test", "--config", QUICKSTART, "--ckpt_path", str(loose), *QUIET).check()
    assert (tmp_path / "runs/quickstart/test/model/test_results.json").is_file()
    assert not (tmp_path / "runs/quickstart/version_1").exists()


def test_checkpoints_record_class_names_and_preprocessing(run_cli, tmp_path):
    run_cli("fit", *TINY, "--trainer.limit_train_batches", "2").check()
    ckpt = tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt"
    deployment = torch.load(ckpt, weights_only=True)["deployment"]
    assert deployment["class_names"][:3] == ["0", "1", "2"]
    assert deployment["img_size"] == 32 and deployment["crop_pct"] == 1.0

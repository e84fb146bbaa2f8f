"""`python -m refiner_pl.analysis.compare`: PNG + JSON from trained checkpoints, one-line errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import quiet_trainer
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.analysis.compare import main
from refiner_pl.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = {"class_path": "refiner_pl.data.DigitsDataModule", "init_args": {"img_size": 32}}


def trained_checkpoint(path: Path, model_name: str = "refiner_vit_tiny", **model_kwargs) -> str:
    """A Lightning checkpoint after one training step on random images."""
    torch.manual_seed(0)
    module = ImageClassifier(
        model_name=model_name, num_classes=10, img_size=32, model_kwargs=model_kwargs or None
    )
    images = TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, DataLoader(images, batch_size=4))
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("compare")
    run = root / "runs" / "tiny" / "version_0"
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": DATA, "trainer": {}}))
    return {
        "refiner": trained_checkpoint(run / "checkpoints" / "refiner.ckpt", depth=2),
        "plain": trained_checkpoint(root / "plain.ckpt", depth=2, refiner=False),
        "no_maps": trained_checkpoint(root / "test_vit.ckpt", model_name="test_vit"),
    }


def test_report_of_a_refiner_and_a_plain_vit(checkpoints, tmp_path, capsys):
    # no --config: the data section comes from the first checkpoint's run folder
    out = tmp_path / "report"
    args = [checkpoints["refiner"], checkpoints["plain"], "--out", str(out)]
    main([*args, "--num_images", "10", "--batch_size", "4", "--display", "1"])
    assert "wrote" in capsys.readouterr().out

    report = json.loads((out / "attention_report.json").read_text())
    assert report["data"] == "DigitsDataModule, first 10 validation images"
    refiner, plain = report["models"]
    assert refiner["name"] == "refiner_vit_tiny"
    assert plain["name"] == "refiner_vit_tiny (refiner off)"
    assert refiner["checkpoint"] == checkpoints["refiner"]
    for model in (refiner, plain):
        shape = (model["layers"], model["heads"], model["grid"], model["images"])
        assert shape == (2, 4, [8, 8], 10)
        assert set(model["raw"]) == {
            "head_similarity",
            "layer_similarity",
            "adjacent_layer_similarity",
            "attention_distance",
            "attention_distance_per_head",
        }
        assert len(model["raw"]["head_similarity"]) == 2
        assert len(model["raw"]["layer_similarity"]) == 2
    assert refiner["block_types"] == ["plain", "shared"] and refiner["refined"] is not None
    assert plain["refined"] is None
    with Image.open(out / "attention_report.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 500


def test_names_and_config_option(checkpoints, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": DATA}))
    out = tmp_path / "report"
    main([checkpoints["plain"], "--config", str(config), "--names", "baseline", "--out", str(out),
          "--num_images", "3", "--display", "0"])  # fmt: skip
    report = json.loads((out / "attention_report.json").read_text())
    assert [model["name"] for model in report["models"]] == ["baseline"]
    assert (out / "attention_report.png").is_file()


BAD = {
    "missing checkpoint": (["missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
    "not a Lightning checkpoint": (["weights.pt"], "is not a Lightning checkpoint of this project"),
    "no attention maps": (["{no_maps}"], "test_vit model, which does not expose attention maps"),
    "another module's checkpoint": (["other.ckpt"], "does not rebuild as an ImageClassifier"),
    "missing config": (["{refiner}", "--config", "nope.yaml"], "config 'nope.yaml' does not exist"),
    "config without data": (["{refiner}", "--config", "empty.yaml"], "has no `data` section"),
    "wrong data section": (
        ["{refiner}", "--config", "typo.yaml"],
        "Option 'img_sise' is not accepted",
    ),
    "names do not match": (["{refiner}", "--names", "a", "b"], "--names gives 2 labels for 1"),
    "no EMA weights": (["{refiner}", "--ema", "true"], "holds no EMA weights"),
    "unknown option": (["{refiner}", "--num_imagez", "3"], "num_imagez"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line(case, checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.zeros(2)}, "weights.pt")
    other_module = {"hyper_parameters": {"hidden": 3}, "pytorch-lightning_version": "2.6"}
    torch.save({"state_dict": {}, **other_module}, "other.ckpt")
    Path("empty.yaml").write_text("trainer: {}\n")
    typo = {"class_path": DATA["class_path"], "init_args": {"img_sise": 32}}
    Path("typo.yaml").write_text(yaml.safe_dump({"data": typo}))
    args, message = BAD[case]
    with pytest.raises(SystemExit) as exit_:
        main([arg.format(**checkpoints) for arg in args] + ["--out", "out"])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr and not Path("out").exists()

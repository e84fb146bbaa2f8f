"""Scoring and predicting through `cli.py`, as a user runs them (in this process), on the
quickstart checkpoint."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, QUIET, RELEASE_FIXTURE, SHORT, run_cli_in_process

from refiner_pl.data import ImageFolderDataModule
from refiner_pl.data.predict import ImageFiles
from refiner_pl.models import from_official_checkpoint

# The fixture's architecture: a refiner_vit_tiny 48 wide, refiners in blocks 2 and 4.
RELEASE_TINY = (
    '{"embed_dim": 48, "mlp_ratio": 3.0, "block_types": ["plain", "shared", "plain", "shared"]}'
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    """One short quickstart fit (1 epoch, 3 train batches, full validation); its run folder."""
    cwd = tmp_path_factory.mktemp("evaluate")
    fit = ("fit", "--config", QUICKSTART, "--trainer.max_epochs", "1", *SHORT)
    run_cli_in_process(*fit, cwd=cwd).check()
    return cwd / "runs" / "quickstart" / "version_0"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_validate_writes_json_that_matches_the_checkpoint(quickstart_run):
    [best] = quickstart_run.glob("checkpoints/epoch=*.ckpt")
    stored = torch.load(best, map_location="cpu", weights_only=True)
    [score] = [
        state["best_model_score"]
        for key, state in stored["callbacks"].items()
        if key.startswith("ModelCheckpoint") and state.get("monitor") == "val/acc1"
    ]

    result = run_cli_in_process(
        "validate", "--config", QUICKSTART, "--ckpt_path", str(best), *QUIET,
        cwd=quickstart_run.parents[2],
    ).check()  # fmt: skip
    path = quickstart_run / "validate" / best.stem / "validate_results.json"  # beside it
    assert str(path.relative_to(quickstart_run.parents[2])) in result.stdout
    results = json.loads(path.read_text())
    assert results["top1"] == pytest.approx(float(score), abs=1e-6)
    assert results["images"] == 360  # 20% of scikit-learn's 1,797 digits
    assert results["checkpoint"] == str(best)
    assert results["ema_weights"] is False
    assert set(results["metrics"]) == {"val/acc1", "val/acc5", "val/loss"}
    assert results["top5"] == results["metrics"]["val/acc5"] >= results["top1"]
    assert results["loss"] == results["metrics"]["val/loss"] > 0
    assert results["config"]["model"]["init_args"]["model_name"] == "refiner_vit_tiny"
    assert results["config"]["ckpt_path"] == str(best)


def test_predict_on_a_folder_skips_and_lists_bad_files(quickstart_run, mixed_image_folder):
    result = run_cli_in_process(
        "predict", "--config", QUICKSTART, "--ckpt_path", "last",
        "--data.predict_dir", str(mixed_image_folder.path), *QUIET,
        cwd=quickstart_run.parents[2],
    ).check()  # fmt: skip
    run = quickstart_run / "predict" / "last"
    assert f"-> {run}/predictions.csv" in result.stdout
    total = len(mixed_image_folder.good) + len(mixed_image_folder.bad)
    assert f"skipped 2 of {total} files" in result.stdout
    for bad in mixed_image_folder.bad:
        assert f"  {bad}: " in result.stdout

    rows = read_csv(run / "predictions.csv")
    assert [row["file"] for row in rows] == mixed_image_folder.good
    assert list(rows[0]) == ["file"] + [
        f"top{k}_{field}" for k in range(1, 6) for field in ("index", "name", "prob")
    ]
    saved = torch.load(run / "predictions.pt", weights_only=True)
    torch.testing.assert_close(saved["probs"].sum(-1), torch.ones(len(rows)))
    for row, probs in zip(rows, saved["probs"], strict=True):
        top = probs.topk(5)
        assert [int(row[f"top{k}_index"]) for k in range(1, 6)] == top.indices.tolist()
        assert row["top1_name"] == row["top1_index"]  # the digits' names are "0" to "9"
        assert float(row["top1_prob"]) == pytest.approx(top.values[0].item(), abs=1e-6)
    skipped = read_csv(run / "predictions_skipped.csv")
    assert sorted(row["file"] for row in skipped) == mixed_image_folder.bad


def test_predict_without_a_folder_predicts_the_val_split(quickstart_run):
    [best] = quickstart_run.glob("checkpoints/epoch=*.ckpt")
    run_cli_in_process(
        "predict", "--config", QUICKSTART, "--ckpt_path", "best", *QUIET,
        cwd=quickstart_run.parents[2],
    ).check()  # fmt: skip
    run = quickstart_run / "predict" / best.stem
    rows = read_csv(run / "predictions.csv")
    assert [row["file"] for row in rows] == [str(i) for i in range(360)]  # in-memory digits
    assert {row["target_name"] for row in rows} == {str(d) for d in range(10)}
    saved = torch.load(run / "predictions.pt", weights_only=True)
    assert saved["probs"].shape == (360, 10)
    assert saved["class_names"] == [str(d) for d in range(10)]


def test_release_checkpoint_scores_a_folder_like_from_official_checkpoint(
    run_cli, tmp_path, make_image_tree
):
    """`--model.init_from release.pth` gives the logits `from_official_checkpoint` gives."""
    release = torch.load(RELEASE_FIXTURE, weights_only=True)
    torch.save({"model": release["state_dict"]}, tmp_path / "release.pth")  # the release layout
    tree = make_image_tree(tmp_path / "data", [f"class_{i}" for i in range(10)],
                           {"train": 1, "val": 2}, ext=".png")  # fmt: skip
    data_args = ["--data", "refiner_pl.data.ImageFolderDataModule",
                 "--data.data_dir", str(tree.path), "--data.num_workers", "0",
                 "--data.img_size", "32"]  # fmt: skip
    model_args = ["--model.model_kwargs", RELEASE_TINY,
                  "--model.init_from", str(tmp_path / "release.pth")]  # fmt: skip

    run_cli("validate", "--config", QUICKSTART, *data_args, *model_args, *QUIET).check()
    run_cli("predict", "--config", QUICKSTART, *data_args, *model_args, *QUIET,
            "--data.predict_dir", str(tree.path / "val")).check()  # fmt: skip

    data = ImageFolderDataModule(str(tree.path), img_size=32, num_workers=0)
    files = ImageFiles(tree.path / "val", data.eval_transform)
    images = torch.stack([files[i].image for i in range(len(files))])
    targets = torch.tensor([int(f.parent.name.split("_")[1]) for f in files.files])
    with torch.no_grad():
        logits = from_official_checkpoint(tmp_path / "release.pth")(images)

    # No checkpoint: the outputs go to <save_dir>/<name>/<command>/<init_from name>/.
    predictions = tmp_path / "runs/quickstart/predict/release/predictions.pt"
    saved = torch.load(predictions, weights_only=True)
    assert saved["files"] == [f.relative_to(tree.path / "val").as_posix() for f in files.files]
    torch.testing.assert_close(saved["probs"], logits.softmax(-1), atol=1e-6, rtol=0)
    json_path = tmp_path / "runs/quickstart/validate/release/validate_results.json"
    results = json.loads(json_path.read_text())
    assert results["images"] == 20
    assert results["top1"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert results["loss"] == pytest.approx(expected_loss, abs=1e-5)

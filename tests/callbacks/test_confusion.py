"""ConfusionMatrixLogger: the matrix, per-class accuracy, and what reaches TensorBoard."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import QUICKSTART, QUIET, quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.callbacks import ConfusionMatrixLogger
from refiner_pl.callbacks.confusion import most_confused_pairs
from refiner_pl.data import ImageFolderDataModule
from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


# A known batch of 4 classes, worked out by hand: row = true class, column = prediction.
TARGETS = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
PREDICTIONS = [0, 0, 1, 1, 1, 0, 3, 3, 3, 1]
HAND_MATRIX = [
    [2, 1, 0, 0],  # class 0: two right, one taken for 1
    [0, 2, 0, 0],  # class 1: both right
    [1, 0, 0, 2],  # class 2: none right, one taken for 0, two for 3
    [0, 1, 0, 1],  # class 3: one right, one taken for 1
]
HAND_ACCURACY = [2 / 3, 1.0, 0.0, 0.5]


class LogitsAsInputs(L.LightningModule):
    """Its batches hold logits: validation_step hands them on, as ImageClassifier's does."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"num_classes": 4})

    def validation_step(self, batch, batch_idx):
        return batch[0]


def known_batches() -> DataLoader:
    logits = F.one_hot(torch.tensor(PREDICTIONS), 4).float() * 3 + 0.1 * torch.randn(10, 4)
    # batches of 4, 4 and 2: the matrix must add up over batches
    return DataLoader(TensorDataset(logits, torch.tensor(TARGETS)), batch_size=4)


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def text(accumulator: EventAccumulator, tag: str) -> str:
    return accumulator.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def validate_known_batch(tmp_path: Path, **kwargs) -> tuple[ConfusionMatrixLogger, str]:
    callback = ConfusionMatrixLogger(**kwargs)
    logger = TensorBoardLogger(tmp_path, name="known")
    quiet_trainer(callbacks=[callback], logger=logger).validate(
        LogitsAsInputs(), known_batches(), verbose=False
    )
    return callback, logger.log_dir


def test_matrix_and_class_accuracy_match_a_hand_count(tmp_path):
    callback, log_dir = validate_known_batch(tmp_path)
    assert callback.matrix.tolist() == HAND_MATRIX
    logged = events(log_dir)
    for index, expected in enumerate(HAND_ACCURACY):
        (scalar,) = logged.Scalars(f"val_class_acc/{index}")
        assert scalar.value == pytest.approx(expected)
    assert logged.Tags()["images"] == ["val/confusion_matrix"]
    assert not logged.Tags()["tensors"]  # no pair tables for few classes


def test_many_classes_log_the_most_confused_pairs_instead(tmp_path):
    callback, log_dir = validate_known_batch(tmp_path, max_image_classes=3, top_k=2)
    assert callback.matrix.tolist() == HAND_MATRIX
    logged = events(log_dir)
    assert not logged.Tags()["images"]
    assert not [tag for tag in logged.Tags()["scalars"] if tag.startswith("val_class_acc/")]
    pairs = text(logged, "val/most_confused").splitlines()
    # the largest off-diagonal entry: class 2 taken for 3 in 2 of its 3 images; then the
    # first of the entries of 1 (row-major order)
    assert pairs[2:] == ["| 2 | 3 | 2 | 66.7% |", "| 0 | 1 | 1 | 33.3% |"]
    least = text(logged, "val/least_accurate").splitlines()
    assert least[2:] == ["| 2 | 0.0% | 3 |", "| 3 | 50.0% | 2 |"]
    histogram = logged.Histograms("val/class_acc")[-1].histogram_value
    assert histogram.num == 4
    assert histogram.sum == pytest.approx(sum(HAND_ACCURACY))


def test_most_confused_pairs_of_a_hand_matrix():
    matrix = torch.tensor(HAND_MATRIX)
    assert most_confused_pairs(matrix, 1) == [(2, 3, 2)]
    pairs = most_confused_pairs(matrix, 16)  # only the non-zero off-diagonal entries
    assert sorted(pairs) == [(0, 1, 1), (2, 0, 1), (2, 3, 2), (3, 1, 1)]


def test_fit_logs_class_names_and_the_figure_every_validation(tmp_path, make_image_tree):
    classes = ["cat", "dog", "red fox"]
    tree = make_image_tree(tmp_path / "images", classes, {"train": 2, "val": 3})
    data = ImageFolderDataModule(
        str(tree.path), img_size=32, batch_size=4, num_workers=0, auto_augment=None, re_prob=0
    )
    torch.manual_seed(0)
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=3, img_size=32, sched="none", lr=1e-3
    )
    callback = ConfusionMatrixLogger()
    logger = TensorBoardLogger(tmp_path, name="fit")
    trainer = quiet_trainer(
        max_epochs=2,
        limit_train_batches=1,
        callbacks=[callback],
        logger=logger,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, data)

    # The logged matrix counts the trained model's own predictions on the validation set.
    module.eval()
    counted = [[0] * 3 for _ in range(3)]
    with torch.no_grad():
        for images, targets in data.val_dataloader():
            for target, prediction in zip(targets, module(images).argmax(-1), strict=True):
                counted[target][prediction] += 1
    assert callback.matrix.tolist() == counted

    logged = events(logger.log_dir)
    tags = ["val_class_acc/0_cat", "val_class_acc/1_dog", "val_class_acc/2_red_fox"]
    assert [t for t in logged.Tags()["scalars"] if t.startswith("val_class_acc/")] == tags
    for tag, row, index in zip(tags, counted, range(3), strict=True):
        steps = [scalar.step for scalar in logged.Scalars(tag)]
        assert steps == [1, 2]  # one per epoch (1 batch each), none for the sanity check
        assert logged.Scalars(tag)[-1].value == pytest.approx(row[index] / sum(row))
    figures = logged.Images("val/confusion_matrix")
    assert [figure.step for figure in figures] == [1, 2]
    assert figures[-1].width > 100 and figures[-1].height > 100


@pytest.mark.slow
def test_quickstart_config_logs_the_confusion_matrix(run_cli, tmp_path):
    run_cli(
        "fit", "--config", QUICKSTART, "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--model.warmup_epochs", "0.5", *QUIET,
    ).check()  # fmt: skip
    logged = events(str(tmp_path / "runs" / "quickstart" / "version_0"))
    assert logged.Tags()["images"] == ["val/confusion_matrix"]
    digits = sorted(t for t in logged.Tags()["scalars"] if t.startswith("val_class_acc/"))
    assert digits == [f"val_class_acc/{digit}" for digit in range(10)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"max_image_classes": 0}, "max_image_classes is 0"), ({"top_k": 0}, "top_k is 0")],
)
def test_bad_arguments(kwargs, expected):
    with pytest.raises(UserInputError, match=expected):
        ConfusionMatrixLogger(**kwargs)


def test_a_validation_step_without_logits_is_reported(tmp_path):
    class NoLogits(LogitsAsInputs):
        def validation_step(self, batch, batch_idx):
            return None

    trainer = quiet_trainer(callbacks=[ConfusionMatrixLogger()])
    with pytest.raises(UserInputError, match="needs validation_step to return the logits"):
        trainer.validate(NoLogits(), known_batches(), verbose=False)

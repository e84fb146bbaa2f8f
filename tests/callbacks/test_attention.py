"""AttentionMonitor: metrics and class-token images in TensorBoard, on the epochs asked for."""

import pytest
import torch
from helpers import QUICKSTART, quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.analysis.attention import attention_summary, collect_attention_maps, series_maps
from refiner_pl.callbacks import EMA, AttentionMonitor
from refiner_pl.cli import RefinerCLI
from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(
    refiner: bool = True, model_name: str = "refiner_vit_tiny", lr: float = 5e-4
) -> ImageClassifier:
    """Two blocks of refiner_vit_tiny: plain then shared (or plain, plain)."""
    torch.manual_seed(0)
    kwargs = {"depth": 2, "refiner": refiner} if model_name == "refiner_vit_tiny" else {}
    return ImageClassifier(
        model_name=model_name,
        num_classes=10,
        img_size=32,
        model_kwargs=kwargs,
        sched="none",
        lr=lr,
    )


def loader(seed: int, n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10)
    return DataLoader(data, batch_size=4)


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_logs_metrics_and_images_every_n_epochs(tmp_path):
    monitor = AttentionMonitor(every_n_epochs=2, num_images=6, num_display=2, tile=16)
    module = tiny()
    logger = TensorBoardLogger(tmp_path, name="attn")
    trainer = quiet_trainer(max_epochs=4, logger=logger, callbacks=[monitor])
    trainer.fit(module, loader(0), loader(1))

    # the first six validation images, gathered across the first two batches
    torch.testing.assert_close(monitor.images, loader(1).dataset.tensors[0][:6])
    logged = events(logger.log_dir)
    tags = logged.Tags()
    for series in ("raw", "refined"):
        assert f"attention_cls/{series}" in tags["images"]
        for tag in (
            f"attention_head_similarity/{series}/layer_1",
            f"attention_layer_similarity/{series}/layer_0_1",
            f"attention_distance/{series}/layer_1",
        ):
            # after epochs 2 and 4 only; 2 batches per epoch
            assert [event.step for event in logged.Scalars(tag)] == [4, 8]

    # the last values were measured with the final weights
    maps, grid = collect_attention_maps(module.model, monitor.images)
    refined = attention_summary(series_maps(maps)["refined"], grid)
    for layer in (0, 1):
        event = logged.Scalars(f"attention_distance/refined/layer_{layer}")[-1]
        assert event.value == pytest.approx(refined["attention_distance"][layer].item(), rel=1e-5)
    event = logged.Scalars("attention_head_similarity/refined/layer_1")[-1]
    assert event.value == pytest.approx(refined["head_similarity"][1].item(), rel=1e-5)

    image = logged.Images("attention_cls/raw")[-1]
    # two images, each a row of input + 2 layers, 16 px tiles with make_grid's 2 px padding
    assert (image.step, image.height, image.width) == (8, 2 + 2 * 18, 2 + 3 * 18)
    assert module.model.training  # the callback leaves the mode as it found it


def test_measures_the_ema_weights_that_validation_scores(tmp_path):
    monitor = AttentionMonitor(num_images=4, num_display=0)
    ema = EMA(decay=0.5)  # after the monitor, as the CLI orders them
    logger = TensorBoardLogger(tmp_path, name="attn")
    module = tiny(lr=1e-2)  # large steps: the average differs visibly from the weights
    quiet_trainer(max_epochs=1, logger=logger, callbacks=[monitor, ema]).fit(
        module, loader(0), loader(1)
    )
    tag = "attention_head_similarity/refined/layer_1"
    [logged] = events(logger.log_dir).Scalars(tag)

    def similarity(network: torch.nn.Module) -> float:
        maps, grid = collect_attention_maps(network, monitor.images)
        return attention_summary(series_maps(maps)["refined"], grid)["head_similarity"][1].item()

    assert logged.value == pytest.approx(similarity(ema.module), rel=1e-5)
    # the raw weights' value is ten times the matching tolerance away (4e-4 here)
    assert logged.value != pytest.approx(similarity(module.model), rel=1e-4)


def test_the_cli_puts_the_attention_section_before_ema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = RefinerCLI(
        args=["--config", QUICKSTART, "--attention.every_n_epochs", "2", "--ema.decay", "0.9"],
        run=False,
    )
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert kinds.index(AttentionMonitor) < kinds.index(EMA)
    [monitor] = [cb for cb in cli.trainer.callbacks if isinstance(cb, AttentionMonitor)]
    assert monitor.every_n_epochs == 2


def test_validate_always_logs_and_a_plain_vit_has_no_refined_series(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="attn")
    monitor = AttentionMonitor(every_n_epochs=5, num_images=4)
    quiet_trainer(logger=logger, callbacks=[monitor]).validate(tiny(refiner=False), loader(1))
    tags = events(logger.log_dir).Tags()
    assert "attention_head_similarity/raw/layer_0" in tags["scalars"]
    assert not [tag for tag in tags["scalars"] + tags["images"] if "refined" in tag]
    assert tags["images"] == ["attention_cls/raw"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "attention.every_n_epochs is 0"),
        ({"num_images": 0}, "attention.num_images is 0"),
        ({"num_images": 2, "num_display": 3}, "attention.num_display is 3"),
        ({"tile": 4}, "attention.tile is 4"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        AttentionMonitor(**kwargs)


def test_a_model_without_attention_maps_is_refused_before_training():
    trainer = quiet_trainer(max_epochs=1, callbacks=[AttentionMonitor()])
    with pytest.raises(UserInputError, match="test_vit|VisionTransformer"):
        trainer.fit(tiny(model_name="test_vit"), loader(0), loader(1))
    assert trainer.global_step == 0


def test_bad_value_in_the_attention_section_is_one_error_line(run_cli, tmp_path):
    line = run_cli("fit", "--config", QUICKSTART, "--attention.every_n_epochs", "0").error
    assert "attention.every_n_epochs is 0" in line
    assert not list(tmp_path.iterdir())  # nothing written


# slow: a fit with the attention report every epoch (~7 s)
@pytest.mark.slow
def test_the_attention_section_of_a_config_file(run_cli, tmp_path):
    (tmp_path / "attention.yaml").write_text("attention:\n  every_n_epochs: 1\n  num_images: 4\n")
    run_cli(
        "fit", "--config", QUICKSTART, "--config", "attention.yaml", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--model.warmup_epochs", "0.5", "--trainer.enable_progress_bar", "false",
    ).check()  # fmt: skip
    tags = events(str(tmp_path / "runs" / "quickstart" / "version_0")).Tags()
    assert {"attention_cls/raw", "attention_cls/refined"} <= set(tags["images"])
    layers = [tag for tag in tags["scalars"] if tag.startswith("attention_distance/refined/")]
    assert len(layers) == 4  # refiner_vit_tiny has 4 blocks

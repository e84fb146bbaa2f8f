"""A short run of the Refiner-ViT-S ImageNet recipe, in-process through the real CLI.

configs/imagenet/base.yaml with refiner_vit_s.yaml, as released (the full timm train transform
on JPEGs, Mixup/CutMix, label smoothing, AdamW, warmup + cosine + cooldown, EMA 0.99996), only
shrunk to 32 px, batches of 4, one CPU and 4 short epochs, then ``validate`` on the EMA weights.
"""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import CONFIGS, QUIET, imagenet_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from refiner_pl.callbacks import EMA
from refiner_pl.checkpoint_io import load_ema_weights
from refiner_pl.cli import RefinerCLI
from refiner_pl.module import ImageClassifier

RECIPE = imagenet_recipe("refiner_vit_s")
SMALL = ["--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"]
ONE_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
           "--trainer.precision", "32-true"]  # fmt: skip


def test_recipe_config_carries_the_release_regularisation():
    config = yaml.safe_load((CONFIGS / "imagenet" / "base.yaml").read_text())
    model = config["model"]["init_args"]
    assert (model["mixup_alpha"], model["cutmix_alpha"], model["mixup_switch_prob"]) == (
        0.8, 1.0, 0.5
    )  # fmt: skip
    assert model["label_smoothing"] == 0.1
    assert config["ema"]["class_path"] == "refiner_pl.callbacks.EMA"
    assert config["ema"]["init_args"]["decay"] == 0.99996


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_short_recipe_run_trains_schedules_and_validates_the_ema(tmp_path, monkeypatch, jpeg_tree):
    monkeypatch.chdir(tmp_path)
    # The schedule is part of the experiment: `--ckpt_path last` below matches it too.
    common = [
        *RECIPE, "--data.data_dir", str(jpeg_tree.path), *SMALL, *ONE_CPU,
        "--model.warmup_epochs", "1", "--model.cooldown_epochs", "1",
    ]  # fmt: skip
    # 12 train images in batches of 4: 3 optimizer steps per epoch, 12 in all: 3 of warmup,
    # 6 of cosine decay, 3 of cooldown at min_lr. One checkpoint (last.ckpt) at the end.
    fit = RefinerCLI(
        [
            "fit",
            *common,
            *QUIET,
            "--trainer.max_epochs",
            "4",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.check_val_every_n_epoch",
            "4",
            "--checkpoint.save_top_k",
            "0",
            "--last_checkpoint.every_n_epochs",
            "4",
        ]  # fmt: skip
    )
    trainer, module = fit.trainer, fit.model
    hp = module.hparams
    assert module.mixup is not None and module.mixup.label_smoothing == 0.1
    assert (hp.mixup_alpha, hp.cutmix_alpha, hp.mixup_switch_prob) == (0.8, 1.0, 0.5)
    assert trainer.global_step == 12
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())

    # The lr the LearningRateMonitor logged before each step: warmup_lr, the base lr when
    # warmup ends, min_lr through the cooldown, and min_lr after the last step.
    run = Path(trainer.log_dir)
    events = EventAccumulator(str(run))
    events.Reload()
    # timm puts weight-decayed and exempt parameters in two groups: lr/pg1 and lr/pg2
    lrs = [event.value for event in events.Scalars("lr/pg1")]
    assert lrs == [event.value for event in events.Scalars("lr/pg2")]
    assert len(lrs) == 12
    assert lrs[0] == pytest.approx(hp.warmup_lr, rel=1e-5)
    assert lrs[3] == pytest.approx(5e-4, rel=1e-5) == pytest.approx(hp.lr)  # end of warmup
    assert all(a > b for a, b in zip(lrs[3:9], lrs[4:9], strict=False))  # cosine decay
    assert lrs[9:] == pytest.approx([1e-5] * 3, rel=1e-5)  # cooldown at min_lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(hp.min_lr)

    [ema] = [callback for callback in trainer.callbacks if isinstance(callback, EMA)]
    assert ema.decay == 0.99996 and ema.num_updates == 12
    average, raw = ema.module.state_dict(), module.model.state_dict()
    assert any(not torch.equal(average[k], raw[k]) for k in raw if raw[k].is_floating_point())

    # `validate --ckpt_path last` scores the EMA weights (the config's ema.validate_ema)...
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    validate = RefinerCLI(["validate", *common, *QUIET, "--ckpt_path", "last"])
    scored = {k: v.item() for k, v in validate.trainer.callback_metrics.items()}

    # ...the metrics of a model loaded with the checkpoint's EMA weights.
    reference = ImageClassifier.load_from_checkpoint(last)
    reference.model.load_state_dict(load_ema_weights(last))
    [expected] = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    ).validate(reference, datamodule=validate.datamodule, verbose=False)
    assert scored.keys() == expected.keys()
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key

"""EMA callback: timm's ModelEmaV3 decay semantics, optimizer steps, checkpoints, evaluation."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import QUICKSTART
from helpers import quiet_trainer as trainer
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.callbacks import EMA
from refiner_pl.checkpoint_io import has_ema_weights, load_ema_weights
from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

# One block of the real refiner_vit_tiny; a high constant lr moves the weights visibly.
TINY = {"model_name": "refiner_vit_tiny", "num_classes": 10, "img_size": 32,
        "model_kwargs": {"depth": 1}, "sched": "none", "lr": 1e-2}  # fmt: skip


def tiny() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(**TINY)


def loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10)
    return DataLoader(data, batch_size=batch_size)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[k], b[k]) for k in a if a[k].is_floating_point())


class Snapshots(L.Callback):
    """The network's weights after every optimizer step."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.after_step):
            self.after_step.append(weights(pl_module.model))


# ------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.0}, "ema decay is 1.0"),
        ({"decay": 0.0}, "ema decay is 0.0"),
        ({"warmup_power": 0.0}, "warmup_power"),
        ({"device": "gpu0"}, "ema device 'gpu0'"),
    ],
)
def test_bad_arguments_raise_user_input_error(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        EMA(**kwargs)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize(
    ("warmup", "decays"),
    [
        (False, [0.0, 0.5, 0.5, 0.5]),  # timm: the first update copies the weights
        (True, [0.0, 1 - 2 ** (-2 / 3), 0.5, 0.5]),  # 1 - (1 + step) ** -2/3, capped at decay
    ],
)
def test_average_follows_timm_decay_once_per_optimizer_step(warmup, decays):
    ema, snapshots = EMA(decay=0.5, warmup=warmup), Snapshots()
    module = tiny()
    fit = trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[ema, snapshots])
    fit.fit(module, loader())  # 4 batches, 2 optimizer steps per epoch

    assert fit.global_step == 4 and ema.num_updates == 4  # not 8: accumulation respected
    expected: dict[str, torch.Tensor] = {}
    for decay, raw in zip(decays, snapshots.after_step, strict=True):
        expected = {
            key: decay * expected.get(key, value) + (1 - decay) * value
            if value.is_floating_point()
            else value  # e.g. BatchNorm's num_batches_tracked: copied
            for key, value in raw.items()
        }
    assert_same(weights(ema.module), expected)
    assert differs(weights(ema.module), weights(module.model))
    assert ema.module.training is False


# --------------------------------------------------------------- checkpoints and evaluation
def _fit_and_save(tmp_path: Path, validate_ema: bool = True) -> tuple[Path, EMA, L.Trainer]:
    ema = EMA(decay=0.5, validate_ema=validate_ema)
    fit = trainer(max_epochs=2, callbacks=[ema])
    fit.fit(tiny(), loader(), loader(8, seed=1))
    path = tmp_path / "ema.ckpt"
    fit.save_checkpoint(path)
    return path, ema, fit


def _val_loss(module: ImageClassifier, callbacks: list | None = None, **kwargs) -> float:
    [result] = trainer(callbacks=callbacks or []).validate(
        module, loader(8, seed=1), verbose=False, **kwargs
    )
    return result["val/loss"]


def test_checkpoint_holds_raw_weights_and_the_average_which_validate_scores(tmp_path):
    path, ema, fit = _fit_and_save(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    raw = weights(fit.lightning_module.model)
    # state_dict: the raw weights, as without EMA; the average: in the callback's state
    assert_same({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}, raw)
    assert_same(checkpoint["callbacks"]["EMA"]["weights"], weights(ema.module))
    assert checkpoint["callbacks"]["EMA"]["num_updates"] == 8
    assert has_ema_weights(path) and differs(load_ema_weights(path), raw)

    # The reference: a module loaded with the EMA weights, validated without any callback.
    reference = ImageClassifier.load_from_checkpoint(path)
    reference.model.load_state_dict(load_ema_weights(path))
    ema_loss = _val_loss(reference)
    raw_loss = _val_loss(ImageClassifier.load_from_checkpoint(path))
    assert ema_loss != pytest.approx(raw_loss)

    # During fit, validate_ema made val/* measure the average (the last one, after step 8).
    assert fit.callback_metrics["val/loss"].item() == pytest.approx(ema_loss, abs=1e-6)

    # validate --ckpt_path: a fresh module and callback score the checkpoint's average...
    module = tiny()
    assert _val_loss(module, [EMA(validate_ema=True)], ckpt_path=path) == pytest.approx(
        ema_loss, abs=1e-6
    )
    assert_same(weights(module.model), raw)  # ...and hand the raw weights back afterwards
    # ...or the raw weights with validate_ema false.
    loss = _val_loss(tiny(), [EMA(validate_ema=False)], ckpt_path=path)
    assert loss == pytest.approx(raw_loss, abs=1e-6)


def test_resume_restores_the_average(tmp_path):
    path, saved, _ = _fit_and_save(tmp_path, validate_ema=False)

    class AtTrainStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.average = weights(ema.module)
            self.updates = ema.num_updates

    ema, probe = EMA(decay=0.5), AtTrainStart()
    resumed = trainer(max_epochs=3, callbacks=[ema, probe])
    resumed.fit(tiny(), loader(), loader(8, seed=1), ckpt_path=path)

    assert_same(probe.average, load_ema_weights(path))
    assert probe.updates == 8
    assert ema.num_updates == 12 and resumed.global_step == 12


def test_scoring_ema_weights_needs_a_checkpoint_that_has_them(run_cli, tmp_path):
    plain = trainer(max_epochs=1)
    plain.fit(tiny(), loader(8))
    path = tmp_path / "plain.ckpt"
    plain.save_checkpoint(path)
    assert not has_ema_weights(path)
    with pytest.raises(UserInputError, match="holds no EMA weights"):
        load_ema_weights(path)
    with pytest.raises(UserInputError, match="no EMA weights to evaluate"):
        _val_loss(tiny(), [EMA(validate_ema=True)], ckpt_path=path)

    # The CLI says so in one line, before validating anything.
    args = ["validate", "--config", QUICKSTART, "--ckpt_path", str(path), "--ema.decay", "0.9"]
    line = run_cli(*args).error
    assert "no EMA weights" in line and "--ema.validate_ema false" in line
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_saved_mid_evaluation_keeps_each_weight_set_in_place():
    module, ema = tiny(), EMA(decay=0.5)
    ema._build(module)
    raw = weights(module.model)
    with torch.no_grad():  # make the average differ from the raw weights
        for value in ema.module.parameters():
            value.add_(1.0)
    average = weights(ema.module)

    ema._swap(module)  # as during a validation epoch with validate_ema
    assert_same(weights(module.model), average)
    checkpoint = {"state_dict": module.state_dict(), "callbacks": {"EMA": ema.state_dict()}}
    ema.on_save_checkpoint(None, module, checkpoint)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert_same(state, raw)
    assert_same(checkpoint["callbacks"]["EMA"]["weights"], average)

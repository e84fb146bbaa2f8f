"""ImageClassifier: construction checks, optimizer groups, lr schedule, metrics, outputs."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier

# One block keeps the CPU tests fast; everything else is the real refiner_vit_tiny preset.
TINY = {"model_name": "refiner_vit_tiny", "num_classes": 10, "img_size": 32}
ONE_BLOCK = {"depth": 1}


def tiny(**kwargs) -> ImageClassifier:
    return ImageClassifier(**{**TINY, "model_kwargs": ONE_BLOCK, **kwargs})


def images(n: int, num_classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % num_classes)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


# ------------------------------------------------------------------------- construction
def test_unknown_model_name_lists_close_matches():
    with pytest.raises(UserInputError, match="unknown model_name 'refiner_vit_xs'") as info:
        ImageClassifier(model_name="refiner_vit_xs", num_classes=10, img_size=32)
    assert "refiner_vit_s" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"drop_path_rate": -0.1}, "drop_path_rate"),
        ({"layer_decay": 1.5}, "layer_decay"),
        ({"opt": "adamz"}, "unknown opt 'adamz'"),
        ({"sched": "cosin"}, "unknown sched 'cosin'"),
        ({"num_classes": 1}, "num_classes"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
    ],
)
def test_bad_hyperparameters_raise_user_input_error(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        tiny(**kwargs)


def test_hyperparameters_are_saved():
    module = tiny(lr=1e-3, layer_decay=0.8)
    assert module.hparams.lr == 1e-3
    assert module.hparams.layer_decay == 0.8
    assert module.hparams.model_kwargs == ONE_BLOCK


def test_img_size_is_only_passed_to_models_that_take_it():
    cnn = ImageClassifier(model_name="resnet18", num_classes=7, img_size=32)  # no img_size arg
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    vit = tiny(img_size=48)
    assert vit(torch.randn(2, 3, 48, 48)).shape == (2, 10)


# ------------------------------------------------------------------------- optimizer
def _group_of(module: ImageClassifier, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    by_id = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: by_id[id(p)] for name, p in module.model.named_parameters()}


def test_no_weight_decay_on_norms_biases_and_tokens():
    module = tiny(weight_decay=0.05, sched="none")
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = _group_of(module, optimizer)
    params = dict(module.model.named_parameters())
    assert len(groups) == len(params)  # every trainable parameter is optimized

    no_decay = {"pos_embed", "cls_token"}
    assert no_decay <= set(groups)
    for name, group in groups.items():
        exempt = params[name].ndim <= 1 or name in no_decay
        assert group["weight_decay"] == (0.0 if exempt else 0.05), name
    # The exemptions cover norms (LayerNorm and BatchNorm) and biases, not only tokens.
    assert any(n.endswith("bias") and groups[n]["weight_decay"] == 0 for n in groups)
    assert any(".bn" in n and groups[n]["weight_decay"] == 0 for n in groups)
    assert groups["head.weight"]["weight_decay"] == 0.05


def test_optimizer_options_reach_the_optimizer():
    module = tiny(sched="none", opt_eps=1e-6, opt_betas=(0.8, 0.95), lr=3e-4)
    optimizer = module.configure_optimizers()
    for group in optimizer.param_groups:
        assert group["eps"] == 1e-6
        assert group["betas"] == (0.8, 0.95)
        assert group["lr"] == 3e-4


def test_layer_decay_scales_lr_from_head_to_stem():
    module = tiny(sched="none", layer_decay=0.5, model_kwargs={"depth": 2})
    groups = _group_of(module, module.configure_optimizers())
    assert groups["head.weight"]["lr_scale"] == 1.0
    assert groups["pos_embed"]["lr_scale"] < groups["blocks.1.mlp.fc1.weight"]["lr_scale"] < 1.0


# ------------------------------------------------------------------------- lr schedule
class LrRecorder(L.Callback):
    """The lr each optimizer step uses (read before the step), as Lightning applies it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit_and_record(module: ImageClassifier, **trainer_kwargs) -> tuple[list[float], float]:
    recorder = LrRecorder()
    fit = trainer(callbacks=[recorder], **trainer_kwargs)
    fit.fit(module, DataLoader(images(32), batch_size=8))  # 4 optimizer steps per epoch
    return recorder.lrs, fit.optimizers[0].param_groups[0]["lr"]


def test_warmup_reaches_base_lr_then_cosine_ends_at_min_lr():
    lr, warmup_lr, min_lr = 1e-3, 1e-6, 1e-5
    module = tiny(lr=lr, warmup_lr=warmup_lr, min_lr=min_lr, warmup_epochs=1)
    lrs, final = _fit_and_record(module, max_epochs=5)

    assert len(lrs) == 20  # total steps come from trainer.estimated_stepping_batches
    assert lrs[0] == pytest.approx(warmup_lr)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5], strict=False))  # linear warmup, 4 steps
    assert lrs[4] == pytest.approx(lr)  # end of warmup: the base lr
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # cosine decay
    assert lrs[-1] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * 15 / 16)) / 2)
    assert final == pytest.approx(min_lr)  # after the last step


def test_cooldown_holds_min_lr_and_layer_decay_scales_every_group():
    module = tiny(lr=1e-3, min_lr=1e-5, warmup_epochs=1, cooldown_epochs=1, layer_decay=0.5)
    lrs, final = _fit_and_record(module, max_epochs=4)
    assert lrs[4] == pytest.approx(1e-3 * module.trainer.optimizers[0].param_groups[0]["lr_scale"])
    assert lrs[-3:] == pytest.approx([1e-5 * lrs[4] / 1e-3] * 3)  # last epoch at min_lr
    for group in module.trainer.optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(1e-5 * group["lr_scale"])


def test_run_shorter_than_warmup_still_trains():
    module = tiny(warmup_epochs=5)
    with pytest.warns(UserWarning, match="scaled down"):
        lrs, final = _fit_and_record(module, fast_dev_run=True)
    assert len(lrs) == 1 and math.isfinite(final)


def test_schedule_none_keeps_lr_constant():
    lrs, final = _fit_and_record(tiny(sched="none", lr=2e-3), max_epochs=2)
    assert set(lrs) == {2e-3} and final == 2e-3


# ------------------------------------------------------------------------- metrics
class Logits(TensorDataset):
    """Inputs that are already logits: with `model = nn.Identity()` metrics are exact."""


def _identity_module(num_classes: int = 10) -> ImageClassifier:
    module = tiny(num_classes=num_classes)
    module.model = nn.Identity()
    return module


def test_eval_metrics_are_exact_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(37, 10, generator=g), torch.randint(0, 10, (37,), generator=g)
    module = _identity_module()
    loader = DataLoader(Logits(logits, targets), batch_size=8)  # 4 x 8 + 5

    [val] = trainer().validate(module, loader, verbose=False)
    [test] = trainer().test(module, loader, verbose=False)

    top5 = logits.topk(5, dim=-1).indices
    expected = {
        "loss": F.cross_entropy(logits, targets).item(),  # per-sample mean, not batch mean
        "acc1": (logits.argmax(-1) == targets).float().mean().item(),  # micro, not macro
        "acc5": (top5 == targets[:, None]).any(-1).float().mean().item(),
    }
    for stage, results in (("val", val), ("test", test)):
        assert set(results) == {f"{stage}/{key}" for key in expected}
        for key, value in expected.items():
            assert results[f"{stage}/{key}"] == pytest.approx(value, abs=1e-6)


def test_acc5_is_left_out_for_five_classes_or_fewer():
    module = _identity_module(num_classes=5)
    loader = DataLoader(Logits(torch.randn(6, 5), torch.arange(6) % 5), batch_size=4)
    [results] = trainer().validate(module, loader, verbose=False)
    assert set(results) == {"val/loss", "val/acc1"}


def test_training_logs_loss_and_epoch_accuracy():
    module = tiny()
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(images(16), batch_size=8))
    assert {"train/loss", "train/acc1"} <= set(fit.logged_metrics)
    assert 0.0 <= fit.logged_metrics["train/acc1"] <= 1.0


def test_soft_targets_use_soft_target_cross_entropy():
    module = tiny(label_smoothing=0.1)
    x = torch.randn(4, 3, 32, 32)
    soft = torch.softmax(torch.randn(4, 10), dim=-1)  # e.g. mixup/cutmix targets
    torch.manual_seed(0)
    loss = module.training_step((x, soft), 0)
    torch.manual_seed(0)
    expected = SoftTargetCrossEntropy()(module(x), soft)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_predict_step_returns_probabilities():
    module = _identity_module()
    logits = torch.randn(6, 10)
    loader = DataLoader(Logits(logits, torch.zeros(6, dtype=torch.long)), batch_size=4)
    probs = torch.cat(trainer().predict(module, loader))
    torch.testing.assert_close(probs, logits.softmax(-1))
    # A batch of images alone works too.
    assert module.predict_step(logits[:2], 0).sum(-1).allclose(torch.ones(2))


def test_max_steps_run_measures_warmup_in_real_epochs():
    module = tiny(lr=1e-3, warmup_lr=0.0, warmup_epochs=1)
    lrs, final = _fit_and_record(module, max_steps=10, max_epochs=-1)  # 4 steps per epoch
    assert len(lrs) == 10
    assert lrs[2] == pytest.approx(0.5e-3) and lrs[4] == pytest.approx(1e-3)
    assert final == pytest.approx(module.hparams.min_lr)

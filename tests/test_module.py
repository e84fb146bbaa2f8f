"""ImageClassifier: construction checks, optimizer groups, lr schedule, metrics, outputs,
mixup/cutmix and lr scaling by the global batch."""

import logging
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer as trainer
from timm.data import Mixup
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
        ({"mixup_alpha": -0.1}, "mixup_alpha must be >= 0"),
        ({"cutmix_alpha": -1.0}, "cutmix_alpha must be >= 0"),
        ({"mixup_prob": 1.5}, "mixup_prob is a probability"),
        ({"mixup_switch_prob": -0.5}, "mixup_switch_prob is a probability"),
        ({"mixup_mode": "pairs"}, "unknown mixup_mode 'pairs'"),
        ({"mixup_off_epoch": 0}, "mixup_off_epoch is 0"),
        ({"lr_base_size": 0}, "lr_base_size is 0"),
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


def test_run_shorter_than_warmup_still_trains(capsys):
    module = tiny(warmup_epochs=5)
    lrs, final = _fit_and_record(module, fast_dev_run=True)
    assert len(lrs) == 1 and math.isfinite(final)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warmup" in line]
    assert len(warnings) == 1 and "shortened to 0.5 steps" in warnings[0]


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


# ------------------------------------------------------------------------- mixup / cutmix
MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1}


class Spy(nn.Module):
    """A loss that records its targets (and whether they are soft) before computing."""

    def __init__(self, loss: nn.Module, calls: list, epoch=lambda: 0) -> None:
        super().__init__()
        self.loss, self.calls, self.epoch = loss, calls, epoch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.epoch(), target.is_floating_point(), target.detach().clone()))
        return self.loss(logits, target)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("mode", "seed"), [("batch", 0), ("batch", 2), ("elem", 0)], ids=["mixup", "cutmix", "elem"]
)
def test_mixup_feeds_timm_mixed_images_and_smoothed_soft_targets(mode, seed):
    module = tiny(**MIX, mixup_mode=mode)
    calls, inputs = [], []
    module.soft_target_criterion = Spy(SoftTargetCrossEntropy(), calls)
    module.model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    # timm's Mixup with the module's hyperparameters, label smoothing folded into the targets
    np.random.seed(seed)
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode=mode,
                  label_smoothing=0.1, num_classes=10)  # fmt: skip
    expected_x, expected_y = mixer(x.clone(), y)
    np.random.seed(seed)
    loss = module.training_step((x.clone(), y), 0)

    [(_, soft, target)] = calls
    assert soft and target.shape == (4, 10)
    torch.testing.assert_close(target, expected_y)
    torch.testing.assert_close(inputs[0], expected_x)
    assert not torch.allclose(inputs[0], x)  # the images were mixed
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    assert ((target > 0.1 / 10 + 1e-6).sum(-1) == 2).all()  # two classes per mixed target
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(SoftTargetCrossEntropy()(module(inputs[0]), target).item())


def test_mixup_needs_an_even_batch_and_class_index_targets():
    module = tiny(**MIX)
    with pytest.raises(UserInputError, match="even data.batch_size .e.g. 6."):
        module.training_step((torch.randn(5, 3, 32, 32), torch.arange(5)), 0)
    with pytest.raises(UserInputError, match="already has soft targets"):
        module.training_step((torch.randn(4, 3, 32, 32), torch.rand(4, 10)), 0)
    tiny().check_batch_size(5)  # without mixing any batch size works


@pytest.mark.usefixtures("one_thread")
def test_mixing_stops_at_mixup_off_epoch():
    module = tiny(**MIX, mixup_off_epoch=2, sched="none")
    calls: list = []
    epoch = lambda: module.current_epoch  # noqa: E731
    module.soft_target_criterion = Spy(SoftTargetCrossEntropy(), calls, epoch)
    module.train_criterion = Spy(module.train_criterion, calls, epoch)
    trainer(max_epochs=3).fit(module, DataLoader(images(8), batch_size=4))  # 2 steps per epoch

    assert [(e, soft) for e, soft, _ in calls] == [
        (0, True), (0, True), (1, True), (1, True), (2, False), (2, False)
    ]  # fmt: skip
    # After it: label-smoothed hard targets, timm's LabelSmoothingCrossEntropy.
    assert calls[-1][2].dtype == torch.long
    assert module.train_criterion.loss.smoothing == 0.1


# ------------------------------------------------------------------ lr scaling by global batch
@pytest.mark.usefixtures("one_thread")
def test_lr_scales_with_devices_and_accumulation(caplog):
    module = tiny(sched="none", lr=4e-4, min_lr=1e-6, lr_base_size=512)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", accumulate_grad_batches=3,
                    logger=False)  # fmt: skip
    module.trainer = ddp
    ddp.datamodule = SimpleNamespace(batch_size=32)  # as a LightningDataModule exposes it
    with caplog.at_level(logging.INFO):
        optimizer = module.configure_optimizers()

    expected = 4e-4 * (32 * 2 * 3) / 512  # per-device batch x world size x accumulation
    assert module.effective_lr == pytest.approx(expected)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
        [expected] * len(optimizer.param_groups)
    )
    [message] = [r.getMessage() for r in caplog.records if "lr_base_size" in r.getMessage()]
    assert "global batch 192 (32 per device x 2 devices x 3 accumulated)" in message
    # warmup_lr and min_lr are not scaled (as in timm's train.py)
    assert module.hparams.warmup_lr == 1e-6 and module.hparams.min_lr == 1e-6


@pytest.mark.usefixtures("one_thread")
def test_scaled_lr_reaches_the_schedule_of_a_real_fit():
    # No datamodule: the batch size comes from the train DataLoader.
    module = tiny(lr=1e-3, min_lr=1e-5, warmup_epochs=1, lr_base_size=64)
    lrs, final = _fit_and_record(module, max_epochs=2, accumulate_grad_batches=2)
    peak = 1e-3 * (8 * 1 * 2) / 64
    assert module.effective_lr == pytest.approx(peak)
    # 4 batches = 2 optimizer steps per epoch; the recorder sees every batch
    assert lrs[0] == pytest.approx(module.hparams.warmup_lr)
    assert lrs[4] == pytest.approx(peak)  # end of warmup: the scaled lr
    assert final == pytest.approx(1e-5)


def test_lr_scaled_below_min_lr_is_rejected():
    module = tiny(lr=1e-3, min_lr=1e-5, lr_base_size=4096)
    assert module.scaled_lr(8192) == pytest.approx(2e-3)
    with pytest.raises(UserInputError, match="below min_lr"):
        module.scaled_lr(32)
    assert tiny(lr=1e-3).scaled_lr(32) == 1e-3  # lr_base_size null: lr as given


def test_refiner_checkpointing_is_switched_on_or_refused():
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=10, img_size=32, refiner_checkpointing=True
    )
    assert all(block.attn.refiner_checkpointing for block in module.model.blocks)
    with pytest.raises(UserInputError, match="refiner_checkpointing needs a Refiner-ViT"):
        ImageClassifier(
            model_name="vit_tiny_patch16_224", num_classes=10, img_size=32,
            refiner_checkpointing=True,
        )  # fmt: skip

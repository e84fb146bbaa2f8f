"""Fine-tuning with `model.init_from`: another resolution, another class count, logged."""

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.module import ImageClassifier


@pytest.fixture(scope="module")
def checkpoint_32px(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A Lightning checkpoint of refiner_vit_tiny trained for a few steps at 32 px."""
    torch.manual_seed(0)
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=10, img_size=32, warmup_epochs=0
    )
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    path = tmp_path_factory.mktemp("ckpt") / "tiny32.ckpt"
    trainer.save_checkpoint(path)
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    return str(path), weights


def test_32px_checkpoint_into_48px_model_resamples_pos_embed(checkpoint_32px, caplog):
    path, trained = checkpoint_32px
    with caplog.at_level(logging.INFO):
        module = ImageClassifier(
            model_name="refiner_vit_tiny", num_classes=10, img_size=48, init_from=path
        )
    expected = resample_abs_pos_embed(trained["pos_embed"], [12, 12], [8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(module.model.pos_embed.data, expected)
    for key, value in module.model.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(value, trained[key], msg=key)
    assert "resampled pos_embed to the new grid" in caplog.text
    assert module(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_other_class_count_reinitialises_only_the_heads(checkpoint_32px, caplog):
    path, trained = checkpoint_32px
    with caplog.at_level(logging.INFO):
        module = ImageClassifier(
            model_name="refiner_vit_tiny", num_classes=3, img_size=32, init_from=path
        )
    state = module.model.state_dict()
    heads = {"head.weight", "head.bias", "aux_head.weight", "aux_head.bias"}
    assert all(state[k].shape[0] == 3 for k in heads)
    for key, value in state.items():
        if key not in heads:
            torch.testing.assert_close(value, trained[key], msg=key)
    kept = len(state) - len(heads)
    assert f"kept {kept} tensors" in caplog.text
    assert "re-initialised head.weight, head.bias, aux_head.weight, aux_head.bias" in caplog.text


# slow: a fit and a validate of the 32 px fine-tune (~9 s)
@pytest.mark.slow
def test_a_finetuned_run_validates_without_its_init_file(checkpoint_32px, tmp_path, monkeypatch):
    """The fine-tuned checkpoint carries its weights: init_from is neither needed nor loaded."""
    from refiner_pl.cli import main

    source, _ = checkpoint_32px
    init = tmp_path / "init.ckpt"
    init.write_bytes(Path(source).read_bytes())
    monkeypatch.chdir(tmp_path)
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    fit = ["fit", "--config", quickstart, "--model.init_from", str(init)]
    main([*fit, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--model.warmup_epochs", "0.5", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    [last] = tmp_path.glob("runs/quickstart/version_0/checkpoints/last.ckpt")
    init.unlink()
    main(["validate", "--config", quickstart, "--model.init_from", str(init),
          "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert "init_from" not in torch.load(last, weights_only=True)["hyper_parameters"]

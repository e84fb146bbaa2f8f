"""Reliability: per-step, per-rank randomness; atomic, code-free checkpoints; NaN losses; bad
training images; checkpoints outside the run folder."""

import logging
import pickle
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import QUICKSTART, REPO, SHORT, quiet_trainer
from timm.data import Mixup
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.callbacks import NonFiniteLoss, NonFiniteLossError
from refiner_pl.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from refiner_pl.cli import RefinerCLI
from refiner_pl.data import ImageFolderDataModule
from refiner_pl.data.folder import UndecodableImage
from refiner_pl.errors import UserInputError
from refiner_pl.module import ImageClassifier
from refiner_pl.seeding import seed_step


# ------------------------------------------------------------------ per-step, per-rank RNG
def test_step_seeds_differ_across_ranks_and_replay_exactly():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    images, targets = torch.rand(4, 3, 16, 16), torch.arange(4)

    def draw(rank: int, batch_idx: int = 3) -> list[torch.Tensor]:
        seed_step(epoch=1, batch_idx=batch_idx, rank=rank, base=42)
        mixed, soft = mixup(images.clone(), targets)  # numpy's global RNG
        return [mixed, soft, torch.rand(8)]  # dropout / drop path draw from torch's

    rank0, rank1 = draw(rank=0), draw(rank=1)
    assert not torch.equal(rank0[0], rank1[0]) and not torch.equal(rank0[2], rank1[2])
    for replayed, first in zip(draw(rank=0), rank0, strict=True):
        assert torch.equal(replayed, first)
    assert not torch.equal(draw(rank=0, batch_idx=4)[2], rank0[2])


class _RecordingClassifier(ImageClassifier):
    """Records what the global RNGs give inside each training step."""

    def training_step(self, batch, batch_idx):
        self.draws.append(
            (self.current_epoch, batch_idx, torch.rand(1).item(), float(np.random.rand()))
        )
        return super().training_step(batch, batch_idx)


def test_every_training_step_starts_from_its_own_seed(one_thread):
    L.seed_everything(7, verbose=False)
    module = _RecordingClassifier(
        model_name="refiner_vit_tiny", num_classes=3, img_size=32, model_kwargs={"depth": 1},
        sched="none", drop_path_rate=0.0,
    )  # fmt: skip
    module.draws = []
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    quiet_trainer(max_epochs=2).fit(module, DataLoader(data, batch_size=4))
    assert [(e, b) for e, b, *_ in module.draws] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch, batch_idx, torch_draw, numpy_draw in module.draws:
        seed_step(epoch, batch_idx, rank=0, base=7)
        assert (torch.rand(1).item(), float(np.random.rand())) == (torch_draw, numpy_draw)


# ----------------------------------------------------------------------- atomic checkpoints
_SAVE_FOREVER = """
import sys
import torch
from refiner_pl.checkpoint_io import AtomicCheckpointIO, read_checkpoint

io, path = AtomicCheckpointIO(), sys.argv[1]
# two payloads of 128 MB: the weights of version v are all (v % 2) + 1
payloads = [{"weights": torch.full((32 * 2**20,), float(fill))} for fill in (1, 2)]
io.save_checkpoint({"version": 1, **payloads[1]}, path)
print("saved", flush=True)
version = 1
while True:  # nothing but saves, so a kill at any moment lands inside one
    version += 1
    io.save_checkpoint({"version": version, **payloads[version % 2]}, path)
"""


@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    for _attempt in range(5):
        saver = subprocess.Popen(
            [sys.executable, "-c", _SAVE_FOREVER, str(path)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert saver.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".last.ckpt.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        saver.kill()  # SIGKILL, while a save is writing its temporary file
        saver.wait()
        if list(tmp_path.glob(".last.ckpt.*.tmp")):
            break  # the kill hit a save in progress (else it fell between two saves)
    else:
        pytest.fail("no kill landed inside a save")

    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["version"] >= 1
    whole = bool(torch.all(state["weights"] == state["version"] % 2 + 1))
    assert whole, "the checkpoint mixes two saves"

    AtomicCheckpointIO().save_checkpoint({"version": 0}, path)  # the next save tidies up
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert read_checkpoint(path)["version"] == 0  # whole, and its checksum verifies


def test_the_cli_trainer_saves_through_atomic_checkpoint_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_ = RefinerCLI(args=["--config", QUICKSTART], run=False)
    assert isinstance(cli_.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_lightning_loads_refuse_a_pickle_that_runs_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _CreatesFile(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------- non-finite loss
def _tiny_module() -> ImageClassifier:
    L.seed_everything(0, verbose=False)
    return ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=3, img_size=32, model_kwargs={"depth": 2},
        sched="none", drop_path_rate=0.0, label_smoothing=0.0, lr=1e-3,
    )  # fmt: skip


def _batches(*nan: bool) -> DataLoader:
    """Batches of 4 images; those flagged in `nan` hold NaN images."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4 * len(nan), 3, 32, 32, generator=generator)
    targets = torch.randint(0, 3, (4 * len(nan),), generator=generator)
    for i, bad in enumerate(nan):
        if bad:
            images[4 * i : 4 * i + 4] = float("nan")
    return DataLoader(TensorDataset(images, targets), batch_size=4)


def _without_nan_batches(loader: DataLoader) -> DataLoader:
    images, targets = loader.dataset.tensors
    keep = torch.isfinite(images).flatten(1).all(1)
    return DataLoader(TensorDataset(images[keep], targets[keep]), batch_size=4)


def _state(module: ImageClassifier) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_nan_loss_stops_before_the_step_and_says_the_input_is_nan(one_thread):
    loader = _batches(False, True, False)
    stopped = _tiny_module()
    with pytest.raises(NonFiniteLossError) as raised:
        quiet_trainer(max_epochs=1, callbacks=[NonFiniteLoss()]).fit(stopped, loader)
    message = str(raised.value)
    assert "the loss is nan at epoch 0, batch 1 (global step 1)" in message
    assert "the batch holds 12288 NaN/inf input values" in message  # 4 images of 3x32x32

    # Weights and BatchNorm statistics are those after batch 0 alone.
    reference = _tiny_module()
    quiet_trainer(max_epochs=1, limit_train_batches=1).fit(reference, loader)
    _assert_same(_state(stopped), _state(reference))


def test_skipped_nan_steps_leave_no_trace(one_thread, caplog):
    loader = _batches(False, True, False, True)
    skipped = _tiny_module()
    callback = NonFiniteLoss(action="skip")
    with pytest.warns(UserWarning, match=r"skipped the optimizer step at epoch 0, batch 1 "):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(skipped, loader)
    assert callback.skipped == 2

    # The same run without the NaN batches: identical weights, optimizer state and BN stats.
    reference = _tiny_module()
    quiet_trainer(max_epochs=1).fit(reference, _without_nan_batches(loader))
    _assert_same(_state(skipped), _state(reference))
    assert all(torch.isfinite(v).all() for v in _state(skipped).values() if v.is_floating_point())


def test_too_many_skips_in_a_row_stop_the_run(one_thread):
    callback = NonFiniteLoss(action="skip", max_consecutive_skips=2)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row had NaN/inf gradients"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(
            _tiny_module(), _batches(False, True, True, False)
        )


def test_bad_nonfinite_arguments():
    with pytest.raises(UserInputError, match="action 'ignore' is unknown"):
        NonFiniteLoss(action="ignore")
    with pytest.raises(UserInputError, match="max_consecutive_skips is 0"):
        NonFiniteLoss(action="skip", max_consecutive_skips=0)


# ------------------------------------------------------------------ undecodable train images
def _break(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # a truncated JPEG


def _train_targets(data: ImageFolderDataModule) -> list[int]:
    data.setup("fit")
    return [int(t) for _, targets in data.train_dataloader() for t in targets]


def test_undecodable_training_image_is_an_error_naming_the_file(jpeg_tree):
    broken = sorted((jpeg_tree.path / "train").rglob("*.JPEG"))[5]
    _break(broken)
    data = ImageFolderDataModule(str(jpeg_tree.path), img_size=32, batch_size=4, num_workers=0)
    with pytest.raises(UndecodableImage, match=rf"cannot decode image '{broken}' .*bad_images"):
        _train_targets(data)


def test_undecodable_training_images_can_be_skipped_and_counted(jpeg_tree, caplog):
    broken = sorted((jpeg_tree.path / "train").rglob("*.JPEG"))[5:7]
    for path in broken:
        _break(path)
    data = ImageFolderDataModule(
        str(jpeg_tree.path), img_size=32, batch_size=4, num_workers=0, bad_images="skip"
    )
    with caplog.at_level(logging.WARNING, logger="refiner_pl.data.folder"):
        targets = _train_targets(data)
    assert len(targets) == 12  # every batch stays full: the next image stands in
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    for path in broken:
        assert any(f"cannot decode image '{path}'" in w for w in warnings)
    assert any("2 skipped so far" in w for w in warnings)

    # Evaluation never skips: a broken val image is an error in any mode.
    _break(sorted((jpeg_tree.path / "val").rglob("*.JPEG"))[0])
    with pytest.raises(UndecodableImage, match="evaluation does not skip images"):
        list(data.val_dataloader())


def test_unknown_bad_images_mode(jpeg_tree):
    with pytest.raises(UserInputError, match="bad_images='ignore' is unknown"):
        ImageFolderDataModule(str(jpeg_tree.path), bad_images="ignore")


# ------------------------------------------------------------------------ output folders
@pytest.mark.slow
def test_a_checkpoint_folder_outside_the_run_folder_is_named(run_cli, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    result = run_cli(
        "fit", "--config", QUICKSTART, *SHORT, "--trainer.max_epochs", "1",
        "--checkpoint.dirpath", str(elsewhere),
    ).check()  # fmt: skip
    run = (tmp_path / "runs" / "quickstart" / "version_0").resolve()
    assert f"checkpoints go to {elsewhere.resolve()}, outside the run folder {run}" in result.stderr
    assert list(elsewhere.glob("epoch=0-*.ckpt"))
    assert (run / "checkpoints" / "last.ckpt").is_file()  # last_checkpoint stays inside
    assert result.stderr.count("outside the run folder") == 1

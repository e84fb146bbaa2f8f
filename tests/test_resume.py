"""Resuming: a fit killed mid-epoch continues to exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import CLI, QUICKSTART, QUIET, SHORT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from refiner_pl.data import DigitsDataModule

TESTS = str(Path(__file__).parent)


class SigkillAfterStep(L.Callback):
    """Kills its own process with SIGKILL once `step` optimizer steps are done.

    A real, uncatchable kill at a known point: Lightning orders checkpoint callbacks last,
    so the kill lands before a checkpoint of that step could be written.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _final_val_acc1(run: Path) -> float:
    """The last val/acc1 the run logged to TensorBoard (over all its event files)."""
    points = []
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "val/acc1" in accumulator.Tags()["scalars"]:
            points += [(e.step, e.value) for e in accumulator.Scalars("val/acc1")]
    return max(points)[1]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(run_cli, one_thread, tmp_path):
    # 2 epochs of 6 steps, a step checkpoint every 4 steps, killed after step 10: the run
    # resumes from the checkpoint of step 8, inside epoch 1, and replays steps 9 to 12.
    args = [
        "fit", "--config", QUICKSTART, "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "6", "--model.warmup_epochs", "0.5",
        "--trainer.deterministic", "true", "--step_checkpoint.every_n_train_steps", "4",
        "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0", *QUIET,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS}
    kill = tmp_path / "kill.yaml"
    kill.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {"class_path": "test_resume.SigkillAfterStep", "init_args": {"step": 10}}
                    ]
                }
            }
        )
    )
    folders = {name: tmp_path / name for name in ("uninterrupted", "killed")}
    runs = {}
    for name, folder in folders.items():  # both at once: one CPU thread each
        folder.mkdir()
        extra = ["--config", str(kill)] if name == "killed" else []
        runs[name] = subprocess.Popen(
            [sys.executable, CLI, *args, *extra],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    outputs = {name: run.communicate(timeout=600) for name, run in runs.items()}
    assert runs["uninterrupted"].returncode == 0, outputs["uninterrupted"][1]
    assert runs["killed"].returncode == -signal.SIGKILL, outputs["killed"][1]

    run = folders["killed"] / "runs" / "quickstart" / "version_0"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 8)  # the middle of epoch 1

    # in this process, on one thread as the two runs above
    resumed = run_cli(*args, "--ckpt_path", "last", cwd=folders["killed"]).check()
    assert "Restored all states" in resumed.stderr
    assert "dataloader is not resumable" not in resumed.stderr

    reference = folders["uninterrupted"] / "runs" / "quickstart" / "version_0"
    final = {
        name: torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        for name, folder in (("uninterrupted", reference), ("resumed", run))
    }
    assert final["resumed"]["global_step"] == final["uninterrupted"]["global_step"] == 12
    weights = {name: state["state_dict"] for name, state in final.items()}
    assert weights["resumed"].keys() == weights["uninterrupted"].keys()
    for key, expected in weights["uninterrupted"].items():
        torch.testing.assert_close(weights["resumed"][key], expected, rtol=0, atol=1e-6, msg=key)
    assert _final_val_acc1(run) == pytest.approx(_final_val_acc1(reference), abs=1e-6)


@pytest.mark.slow
def test_fit_into_a_run_folder_with_a_last_checkpoint_resumes_it(run_cli, tmp_path):
    args = ["fit", "--config", QUICKSTART, *SHORT, "--trainer.logger.init_args.version", "job"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]
    run_cli(*args, "--trainer.max_epochs", "1").check()

    # The same command again, as a requeued job runs it, with a longer schedule.
    again = run_cli(*args, "--trainer.max_epochs", "2").check()
    last = tmp_path / "runs" / "quickstart" / "job" / "checkpoints" / "last.ckpt"
    assert f"resuming from {last.relative_to(tmp_path)}" in again.stderr
    assert "Restored all states" in again.stderr
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert [p.name for p in (tmp_path / "runs" / "quickstart").iterdir()] == ["job"]


# --------------------------------------------------------------- the train loader, in-process
def _batches(num_workers: int = 0, done: int = 0, epoch: int = 0) -> list[torch.Tensor]:
    data = DigitsDataModule(img_size=16, batch_size=32, num_workers=num_workers)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.batches_done = lambda: done  # what the fit loop reports after a resume
    loader.sampler.set_epoch(epoch)
    return [images for images, _ in loader][:4]


@pytest.mark.slow
def test_resumed_epoch_continues_with_the_same_batches_and_augmentations():
    full = _batches()
    assert len(full) == 4
    resumed = _batches(done=2)
    torch.testing.assert_close(resumed[:2], full[2:4], rtol=0, atol=0)
    # the images are augmented (a random affine): another epoch draws other ones
    other_epoch = _batches(epoch=1)
    assert not torch.equal(other_epoch[0], full[0])


# slow: starts DataLoader worker processes (~12 s)
@pytest.mark.slow
def test_augmentations_do_not_depend_on_the_worker_processes():
    torch.testing.assert_close(_batches(num_workers=2), _batches(), rtol=0, atol=0)

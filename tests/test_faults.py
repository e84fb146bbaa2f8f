"""Faults a cluster brings: pre-emption, divergence, two runs in one folder, damaged
checkpoints, full or read-only storage. Real signals, real files, real mounts (as root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import CLI, QUICKSTART, QUIET, run_cli_in_process

from refiner_pl.checkpoint_io import DIGEST_KEY, read_checkpoint
from refiner_pl.errors import UserInputError, storage_error_message
from refiner_pl.runs import RunLock

TESTS = str(Path(__file__).parent)
TINY = [
    "--config", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2", "--precise_bn.num_batches", "2", *QUIET,
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short quickstart fit; tests copy its run folder rather than train again."""
    folder = tmp_path_factory.mktemp("trained")
    run_cli_in_process("fit", *TINY, cwd=folder).check()
    return folder / "runs" / "quickstart" / "version_0"


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "quickstart" / "version_0"
    shutil.copytree(trained_run, run)
    return run


# ------------------------------------------------------------------------- pre-emption
class SigtermAfterStep(L.Callback):
    """Sends SIGTERM to its own process once `step` optimizer steps are done, as a
    scheduler's pre-emption would; Lightning stops after that batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_saves_a_resumable_last_checkpoint_and_exits_143(tmp_path):
    # The quickstart for 2 epochs of 8 steps, stopped by SIGTERM after step 8 + 4 (the
    # middle of the run and of epoch 1); rerunning the same command finishes it.
    args = [
        "fit", "--config", QUICKSTART, "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "2",
        "--precise_bn.num_batches", "2", "--trainer.logger.init_args.version", "0", *QUIET,
    ]  # fmt: skip
    stop = tmp_path / "stop.yaml"
    callback = {"class_path": "test_faults.SigtermAfterStep", "init_args": {"step": 12}}
    stop.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    env = {**os.environ, "PYTHONPATH": TESTS}
    stopped_dir, reference_dir = tmp_path / "stopped", tmp_path / "reference"
    stopped_dir.mkdir()
    reference_dir.mkdir()
    stopped = subprocess.run(
        [sys.executable, CLI, *args, "--config", str(stop)],
        cwd=stopped_dir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at epoch 1, step 12" in stopped.stderr
    last = stopped_dir / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 12)
    assert not (last.parent.parent / ".lock").exists()  # released on the way out

    run_cli_in_process(*args, cwd=stopped_dir).check()  # the same command resumes
    run_cli_in_process(*args, cwd=reference_dir).check()
    final = {
        name: torch.load(
            folder / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt",
            weights_only=True,
        )
        for name, folder in (("resumed", stopped_dir), ("reference", reference_dir))
    }
    assert final["resumed"]["global_step"] == final["reference"]["global_step"] == 16
    for key, expected in final["reference"]["state_dict"].items():
        torch.testing.assert_close(
            final["resumed"]["state_dict"][key], expected, rtol=0, atol=1e-6, msg=key
        )


# -------------------------------------------------------------------------- divergence
def test_a_diverging_run_writes_no_checkpoint(run_cli, tmp_path):
    # lr 1e6: two finite training losses, then weights that give a NaN validation loss.
    result = run_cli("fit", *TINY, "--model.init_args.lr", "1e6", "--model.init_args.min_lr", "0")
    assert "diverged" in result.error
    checkpoints = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints"
    assert not list(checkpoints.glob("*.ckpt"))


def test_non_finite_weights_are_never_saved(tmp_path):
    from refiner_pl.checkpoint_io import AtomicCheckpointIO, NonFiniteCheckpointError

    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()
    with pytest.raises(NonFiniteCheckpointError, match="holds NaN/inf"):
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path
        )
    assert path.read_bytes() == before  # the last good file stays


# ---------------------------------------------------------------------------- run lock
@pytest.mark.slow  # starts a process: the live holder of the lock
def test_a_second_live_run_into_a_run_folder_stops(run_cli, tmp_path):
    run = tmp_path / "runs" / "quickstart" / "version_0"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = run / ".lock"
        lock.write_text(f'{{"host": "{os.uname().nodename}", "pid": {holder.pid}, "started": 0}}')
        result = run_cli("fit", *TINY, "--trainer.logger.init_args.version", "0")
        assert f"is in use by another fit (pid {holder.pid}" in result.error
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, and the same command now runs.
    run_cli("fit", *TINY, "--trainer.logger.init_args.version", "0").check()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / ".lock").exists()


def test_a_lock_of_another_host_is_stale_after_its_heartbeat_stops(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text('{"host": "elsewhere", "pid": 1, "started": 0}')
    with pytest.raises(UserInputError, match="pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()
    old = lock.stat().st_mtime - RunLock.STALE_SECONDS - 1
    os.utime(lock, (old, old))
    held = RunLock(tmp_path).acquire()
    assert f'"pid": {os.getpid()}' in lock.read_text()
    held.release()
    assert not lock.exists()


# ---------------------------------------------------------------------------- integrity
def _damage(path: Path, offset: int, size: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = os.urandom(size)
    path.write_bytes(bytes(data))


def _tensor_offset(path: Path, key: str) -> int:
    """Where the bytes of state_dict[key] lie in a torch.save zip file."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    tensor = checkpoint["state_dict"][key]
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    offset = path.read_bytes().find(needle)
    assert offset > 0
    return offset


def test_damaged_tensor_bytes_stop_with_one_line(trained_run, run_cli, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    _damage(ckpt, _tensor_offset(ckpt, "model.patch_embed.bn1.running_mean"), 64)
    result = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", str(ckpt), *QUIET)
    assert "is damaged" in result.error and "last.ckpt" in result.error
    assert not (run / "validate").exists()


def test_damaged_bytes_mid_file_stop_with_one_line(trained_run, run_cli, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    _damage(ckpt, ckpt.stat().st_size // 2, 4096)
    result = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", str(ckpt), *QUIET)
    assert "last.ckpt" in result.error
    assert "damaged" in result.error or "truncated" in result.error


def test_a_checkpoint_without_a_digest_loads_with_a_note(trained_run, run_cli, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert DIGEST_KEY in checkpoint
    del checkpoint[DIGEST_KEY]
    torch.save(checkpoint, ckpt)  # as an older version wrote them
    result = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", str(ckpt), *QUIET)
    result.check()
    assert "carries no checksum" in result.stderr


def test_every_saved_checkpoint_verifies(trained_run):
    for ckpt in (trained_run / "checkpoints").glob("*.ckpt"):
        assert read_checkpoint(ckpt)[DIGEST_KEY]["sha256"]


# ------------------------------------------------------------------------------ storage
def _mount(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs or a read-only bind needs root")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount refused here: {result.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_saved_checkpoints(trained_run, run_cli, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    _mount("-t", "tmpfs", "-o", "size=5m", f"tmpfs-{uuid.uuid4().hex[:6]}", str(runs))
    try:
        run = runs / "quickstart" / "version_0"
        (run / "checkpoints").mkdir(parents=True)
        # epoch 0's last.ckpt (3.5 MB): resuming writes epoch 1's two, which do not fit
        shutil.copy(trained_run / "checkpoints" / "last.ckpt", run / "checkpoints")
        before = (run / "checkpoints" / "last.ckpt").read_bytes()
        result = run_cli(
            "fit", *TINY, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "0"
        )
        assert result.error.startswith("error: no space left on the device to write")
        assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
        assert not list((run / "checkpoints").glob(".*.tmp"))
    finally:
        _umount(runs)


def test_read_only_storage(trained_run, run_cli, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(trained_run.parent.parent, source / "runs")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    _mount("--bind", str(source), str(readonly))
    try:
        _mount("-o", "remount,ro,bind", str(readonly))
        work = tmp_path / "work"
        work.mkdir()
        # Training into it: one line naming the folder.
        fit = run_cli(
            "fit", *TINY, "--trainer.logger.init_args.save_dir", str(readonly / "runs"), cwd=work
        )
        assert "read-only" in fit.error and str(readonly) in fit.error
        # Scoring a checkpoint that sits there: works, results go somewhere writable.
        ckpt = readonly / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
        result = run_cli(
            "validate", "--config", QUICKSTART, "--ckpt_path", str(ckpt), *QUIET, cwd=work
        ).check()
        assert "is not writable: the validate results go to" in result.stderr
        assert list((work / "runs" / "validate").glob("*/validate_results.json"))
    finally:
        _umount(readonly)


def test_a_storage_error_behind_a_logging_error_is_named():
    # Lightning's TensorBoard logger re-raises a failed event write as a ValueError.
    try:
        try:
            raise OSError(30, "Read-only file system", "/runs/x/events.out")
        except OSError as err:
            raise ValueError("you tried to log 2.13 which is currently not supported") from err
    except ValueError as err:
        message = storage_error_message(err)
    assert message is not None and "read-only" in message and "/runs/x/events.out" in message

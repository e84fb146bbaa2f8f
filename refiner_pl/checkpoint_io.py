"""Checkpoint files that a kill during a save cannot damage, loaded without running code.

`AtomicCheckpointIO` is Lightning's ``TorchCheckpointIO`` with two changes, plugged in through
Lightning's ``CheckpointIO`` plugin API (the CLI adds it to ``trainer.plugins`` by default):

* saving writes ``.<name>.<random>.tmp`` in the checkpoint's own folder, flushes it to disk
  (``fsync``), then renames it over the real name (``os.replace``, atomic on POSIX and
  Windows) and syncs the folder. A process killed at any moment leaves either the previous
  checkpoint or the new one under that name, never a torn file. (Lightning's own local save
  stages the file in the system temp folder; where that is another filesystem, as a tmpfs
  ``/tmp`` often is, the final move is a copy onto the real name, and nothing is synced.)
  Remote paths (``s3://`` ...) keep Lightning's fsspec transaction;
* loading defaults to ``torch.load(..., weights_only=True)``: a checkpoint whose pickle would
  build arbitrary objects (run code) is refused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from refiner_pl.errors import UserInputError
from refiner_pl.models import read_checkpoint

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "check_lightning_checkpoint"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to `path` through a synced temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:  # "x": never another writer's file; honours the umask
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)  # the rename itself survives a power cut
    # Temporary files of saves that were killed before their rename (this one is gone).
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that saves atomically and loads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # None would leave the choice to torch (and its TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
        weights_only = True if weights_only is None else weights_only
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def check_lightning_checkpoint(path: str) -> None:
    """Raises `UserInputError` unless `path` is a readable Lightning checkpoint of plain data.

    For ``--ckpt_path``: before Lightning (and LightningCLI, for the hyperparameters) load it,
    a missing, truncated or foreign file, or one whose pickle would run code, becomes one
    line naming the problem and the fix. URLs are left to Lightning.
    """
    if "://" in path:
        return
    if not Path(path).is_file():
        raise UserInputError(
            f"ckpt_path {path!r} does not exist: pass a checkpoint file, or 'last'/'best'"
        )
    checkpoint = read_checkpoint(path)  # weights_only=True, one line for every failure
    if "pytorch-lightning_version" not in checkpoint or "state_dict" not in checkpoint:
        raise UserInputError(
            f"ckpt_path {path!r} is not a Lightning checkpoint written by `fit` (a release "
            "or model weights file?): to start from its weights, pass it as --model.init_from"
        )

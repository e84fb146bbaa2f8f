"""Checkpoint I/O: every checkpoint this project reads or writes goes through here.

* `read_checkpoint`: ``torch.load(..., weights_only=True)``, memory-mapped where the format
  allows, one clear line for a missing, truncated, damaged or foreign file, or one whose
  pickle would build arbitrary objects (run code);
* `atomic_torch_save`: writes ``.<name>.<random>.tmp`` in the checkpoint's own folder, flushes
  it to disk (``fsync``), renames it over the real name (atomic on POSIX and Windows) and
  syncs the folder. A process killed at any moment leaves the previous file or the new one
  under that name, never a torn file. (Lightning's own local save stages the file in the
  system temp folder; where that is another filesystem, as a tmpfs ``/tmp`` often is, the
  final move is a copy onto the real name, and nothing is synced.) Every saved dict carries a
  SHA-256 digest of its contents (`content_digest`), checked on every read: flipped bytes,
  which ``torch.load`` does not notice in tensor data, become one error line naming the file;
* `AtomicCheckpointIO`: the two above as Lightning's ``CheckpointIO`` plugin (the CLI adds it
  to ``trainer.plugins``), which also refuses to write a checkpoint whose weights are NaN/inf.
  Remote paths (``s3://`` ...) keep Lightning's fsspec transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from refiner_pl.errors import UserInputError, say

__all__ = [
    "AtomicCheckpointIO",
    "DIGEST_KEY",
    "EMA_STATE_KEY",
    "NonFiniteCheckpointError",
    "atomic_torch_save",
    "check_lightning_checkpoint",
    "content_digest",
    "ema_weights_in",
    "first_non_finite",
    "has_ema_weights",
    "load_ema_weights",
    "no_ema_weights_message",
    "read_checkpoint",
    "verify_digest",
]

DIGEST_KEY = "refiner_pl_digest"
"""Key of ``{"sha256": hex}`` in every dict this project saves."""
EMA_STATE_KEY = "EMA"
"""Key of the `EMA` callback's state in ``checkpoint["callbacks"]``; its ``weights`` are the
averaged network's state_dict."""

_NOTED_UNVERIFIED: set[Path] = set()  # files already named in a "no checksum" note


class NonFiniteCheckpointError(UserInputError):
    """The weights to be saved hold NaN/inf: the file on disk stays the last good one."""


# ------------------------------------------------------------------------------ digest
def content_digest(obj: Any) -> str:
    """SHA-256 over every tensor's key path, dtype, shape and bytes, and every plain value,
    in the dict's own order (which ``torch.save``/``torch.load`` keep)."""
    digest = hashlib.sha256()
    _feed(digest, "", obj)
    return digest.hexdigest()


def _feed(digest: Any, where: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{where}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key != DIGEST_KEY:
                _feed(digest, f"{where}/{key!r}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _feed(digest, f"{where}/{index}", item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{where}={value!r}\n".encode())
    else:  # torch.Size, dtypes and the like: their type is enough
        digest.update(f"{where}:{type(value).__name__}\n".encode())


def verify_digest(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Checks a loaded checkpoint against the digest saved in it; False when it has none."""
    recorded = checkpoint.get(DIGEST_KEY)
    if not isinstance(recorded, Mapping) or "sha256" not in recorded:
        resolved = Path(path).resolve()
        if resolved not in _NOTED_UNVERIFIED:  # once per file, however often it is read
            _NOTED_UNVERIFIED.add(resolved)
            say(
                f"note: {path} carries no checksum (a release file, or written by an older "
                "version): loaded unverified"
            )
        return False
    if content_digest(checkpoint) != recorded["sha256"]:
        raise UserInputError(
            f"checkpoint {str(path)!r} is damaged: its contents do not match the checksum "
            "written with it; restore it from a copy, or use another checkpoint of the run "
            "(e.g. last.ckpt or an earlier epoch)"
        )
    return True


def first_non_finite(state: Mapping[str, Any], where: str = "") -> str | None:
    """Key path of the first floating tensor in `state` (nested) holding NaN/inf, else None."""
    for key, value in state.items():
        path = f"{where}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return path
        elif isinstance(value, Mapping):
            found = first_non_finite(value, f"{path}.")
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------- read
def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear line.

    With `verify`, a checkpoint written here is checked against the checksum it carries
    (`verify_digest`); files without one (older versions, releases) load with a note.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint {str(path)!r} does not exist: check the path")
    with path.open("rb") as f:
        head = f.read(2)
    is_zip = head == b"PK"  # torch.save's format; legacy files are a bare pickle
    try:
        # Memory-mapped where the format allows: a check of a multi-GB checkpoint before
        # Lightning loads it reads only the pages it touches.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        if not (is_zip or head[:1] == b"\x80"):  # not a pickle at all, e.g. a text file
            raise UserInputError(
                f"cannot read checkpoint {str(path)!r}: it is not a PyTorch checkpoint; "
                "point at a .ckpt/.pth/.pt file"
            ) from None
        raise UserInputError(
            f"refused to load {str(path)!r}: it contains pickled objects that are not plain "
            f"tensors ({_unpickler_reason(err)[:160]}); only load checkpoints from sources you "
            "trust, and re-save them as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserInputError(
            f"cannot read checkpoint {str(path)!r}: the file is truncated, damaged or not a "
            f"PyTorch checkpoint ({_first_sentence(err)}); restore it from a copy or re-save it"
        ) from None
    if not isinstance(loaded, Mapping):
        raise UserInputError(
            f"checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a state dict"
        )
    loaded = dict(loaded)
    if verify:
        verify_digest(loaded, path)
    return loaded


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's weights-only report that names what was refused, without ANSI codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    reasons = [line for line in lines if line.startswith(("Unsupported", "Trying to"))]
    return reasons[0] if reasons else (lines[0] if lines else type(err).__name__)


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an exception's message, whole (torch's run on for lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence.rstrip(".")


# -------------------------------------------------------------------------------- write
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to `path` through a synced temporary file in the same folder; a dict
    gets its content digest (`DIGEST_KEY`)."""
    path = Path(path)
    if isinstance(obj, Mapping):
        obj = {**obj, DIGEST_KEY: {"sha256": content_digest(obj)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:  # "x": never another writer's file; honours the umask
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:  # name the file being written
            raise OSError(err.errno, err.strerror, str(path)) from err
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
    """``TorchCheckpointIO`` that saves atomically with a digest, never saves NaN/inf weights,
    and loads with ``weights_only=True``, verifying the digest."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        weights = {"state_dict": checkpoint.get("state_dict", {})}
        for key, state in checkpoint.get("callbacks", {}).items():  # e.g. the EMA's average
            if isinstance(state, Mapping) and isinstance(state.get("weights"), Mapping):
                weights[f"callbacks.{key}.weights"] = state["weights"]
        bad = first_non_finite(weights)
        if bad is not None:
            raise NonFiniteCheckpointError(
                f"refused to write {path}: {bad} holds NaN/inf values, so the training has "
                "diverged; the checkpoints on disk are the last good ones: resume from one "
                "with a lower model.lr or with trainer.gradient_clip_val set"
            )
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
        checkpoint = super().load_checkpoint(
            path, map_location=map_location, weights_only=weights_only
        )
        if isinstance(checkpoint, Mapping) and DIGEST_KEY in checkpoint:
            verify_digest(checkpoint, path)
        return checkpoint


def check_lightning_checkpoint(path: str) -> None:
    """Raises `UserInputError` unless `path` is an intact Lightning checkpoint of plain data.

    For ``--ckpt_path``: before Lightning (and LightningCLI, for the hyperparameters) load it,
    a missing, truncated, damaged or foreign file, or one whose pickle would run code, becomes
    one line naming the problem and the fix. URLs are left to Lightning.
    """
    if "://" in path:
        return
    if not Path(path).is_file():
        raise UserInputError(
            f"ckpt_path {path!r} does not exist: pass a checkpoint file, or 'last'/'best'"
        )
    checkpoint = read_checkpoint(path)  # weights_only, digest verified
    if "pytorch-lightning_version" not in checkpoint or "state_dict" not in checkpoint:
        raise UserInputError(
            f"ckpt_path {path!r} is not a Lightning checkpoint written by `fit` (a release "
            "or model weights file?): to start from its weights, pass it as --model.init_from"
        )


# ----------------------------------------------------------------- EMA weights
def load_ema_weights(checkpoint_path: str | Path) -> dict[str, Tensor]:
    """The averaged weights the `EMA` callback saved in a checkpoint, as the network's
    state_dict.

    ``ImageClassifier.load_from_checkpoint(path).model.load_state_dict(load_ema_weights(path))``
    gives a module with the EMA weights, e.g. to export them.
    """
    weights = ema_weights_in(read_checkpoint(checkpoint_path))
    if not weights:
        raise UserInputError(no_ema_weights_message(checkpoint_path))
    return weights


def ema_weights_in(checkpoint: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """The `EMA` weights of a loaded Lightning checkpoint; None when it has none."""
    return (checkpoint.get("callbacks", {}).get(EMA_STATE_KEY) or {}).get("weights") or None


def no_ema_weights_message(checkpoint_path: str | Path) -> str:
    """The error line for a request of EMA weights that a checkpoint does not hold."""
    return (
        f"{checkpoint_path} holds no EMA weights: it was trained without the EMA callback "
        "(the `ema` config section); use its raw weights instead"
    )


def has_ema_weights(checkpoint_path: str | Path) -> bool:
    """Whether a checkpoint carries `EMA` weights (reads no tensor data)."""
    checkpoint = read_checkpoint(checkpoint_path, verify=False)  # memory-mapped, no tensor read
    return ema_weights_in(checkpoint) is not None

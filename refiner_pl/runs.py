"""Run folders and checkpoint aliases: where a run writes, and which file ``best``/``last`` mean.

A run folder is ``<save_dir>/<name>/version_<n>/`` (TensorBoard's layout) with the
checkpoints in its ``checkpoints/`` folder. ``--ckpt_path best`` and ``last`` look at every run
of the experiment (``<save_dir>/<name>``) whose checkpoints were trained with the same model
and data configuration as the command's, read off the checkpoint's stored hyperparameters:

* ``best``: the checkpoint with the best monitored score over all those runs;
* ``last``: ``last.ckpt`` of the newest of them.

A run trained with another model or data is never picked: a line names what differs. The
evaluation commands (``validate``/``test``/``predict``) write their results next to the
checkpoint they score, in ``<run>/<command>/<checkpoint name>/``, so they never take the next
training version.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from refiner_pl.checkpoint_io import read_checkpoint
from refiner_pl.errors import UserInputError, say

CKPT_ALIASES = ("best", "last")
EVALUATION_COMMANDS = ("validate", "test", "predict")

# An alias picks among runs whose network and evaluation data match the command. Settings
# that only change how a run trains (the recipe, augmentation) or executes (workers, paths)
# do not enter the match: `validate --ckpt_path best` after an lr sweep scores the best lr's
# run. (The model's num_classes and img_size come from the data, which is compared itself.)
TRAINING_ONLY_MODEL_KEYS = frozenset(
    {
        "pretrained", "init_from", "drop_rate", "drop_path_rate",
        "grad_checkpointing", "refiner_checkpointing", "num_classes", "img_size",
        "lr", "lr_base_size", "weight_decay", "layer_decay", "opt", "opt_eps", "opt_betas",
        "sched", "warmup_epochs", "warmup_lr", "min_lr", "cooldown_epochs",
        "label_smoothing", "mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_switch_prob",
        "mixup_mode", "mixup_off_epoch",
        "token_label_weight", "attn_similarity_weight", "attn_similarity_pairs",
    }
)  # fmt: skip
TRAINING_ONLY_DATA_KEYS = frozenset(
    {
        "num_workers", "pin_memory", "persistent_workers", "predict_dir", "batch_size",
        "download", "bad_images", "train_fraction", "repeated_aug",
        "augment", "hflip", "padding", "scale", "ratio", "auto_augment", "color_jitter",
        "train_interpolation", "re_prob", "re_mode", "re_count",
        "token_label_dir", "missing_label_maps",
    }
)  # fmt: skip


# ------------------------------------------------------------------------------ layout
def logger_args(config: Namespace) -> Namespace | None:
    """init_args of the (first) logger when it writes under a save_dir, as TensorBoard does."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace):
        if logger.init_args.get("save_dir"):
            return logger.init_args
    return None


def experiment_root(config: Namespace) -> Path:
    """``<save_dir>/<name>``: the folder holding the runs of this experiment."""
    args = logger_args(config)
    assert args is not None
    return Path(args.save_dir) / (args.get("name") or "")


def version_number(run: Path) -> int | None:
    number = run.name.removeprefix("version_")
    return int(number) if run.name.startswith("version_") and number.isdigit() else None


def run_folder_of(ckpt_path: str | os.PathLike) -> Path | None:
    """The run folder of ``<run>/checkpoints/<file>.ckpt``, else None."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def last_checkpoint_name(config: Namespace) -> str:
    return f"{config.last_checkpoint.get('filename') or 'last'}.ckpt"


def _candidate_checkpoint_dirs(config: Namespace) -> list[Path]:
    """Checkpoint folders of this experiment's runs that hold a checkpoint, newest first."""
    if config.checkpoint.get("dirpath"):
        folders = [Path(config.checkpoint.dirpath)]
    else:
        args = logger_args(config)
        if args is None:
            raise UserInputError(
                "ckpt_path 'best'/'last' needs a logger with a save_dir (trainer.logger) or "
                "checkpoint.dirpath to find the runs; pass a checkpoint file instead"
            )
        root, version = experiment_root(config), args.get("version")
        if version is not None:  # a fixed run folder: look only there
            runs = [root / (version if isinstance(version, str) else f"version_{version}")]
        else:
            runs = [run for run in root.glob("*") if (run / "checkpoints").is_dir()]
            # numbered runs by number, then any named ones, newest first
            runs.sort(key=lambda run: (version_number(run) or -1, run.stat().st_mtime))
            runs.reverse()
        folders = [run / "checkpoints" for run in runs]
    return [folder for folder in folders if any(folder.glob("*.ckpt"))]


def describe_runs(config: Namespace) -> str:
    if config.checkpoint.get("dirpath"):
        return str(config.checkpoint.dirpath)
    return f"{experiment_root(config)}/*/checkpoints"


# ------------------------------------------------------------------- config matching
def _plain(value: Any) -> Any:
    """Config values in one comparable form (tuples as lists, Namespaces as dicts)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _section(config: Namespace, key: str) -> tuple[str | None, dict[str, Any]]:
    """(class_path, init_args) of the command's ``model`` or ``data`` section."""
    section = config.get(key)
    if not isinstance(section, Namespace):
        return None, {}
    return section.get("class_path"), _plain(section.get("init_args") or {})


def _stored(hparams: Mapping[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """(class_path, init args) from a checkpoint's saved hyperparameters."""
    hparams = dict(hparams or {})
    hparams.pop("_instantiator", None)
    return hparams.pop("_class_path", None), _plain(hparams)


def config_differences(config: Namespace, checkpoint: Mapping[str, Any]) -> list[str]:
    """``data.img_size=32 (checkpoint: 16)``-style lines for every network or evaluation-data
    setting of the command that the checkpoint was trained with otherwise; empty when it
    fits. Training-only settings (`TRAINING_ONLY_MODEL_KEYS`, `..._DATA_KEYS`) never count."""
    differences = []
    for section, stored_key, ignored in (
        ("model", "hyper_parameters", TRAINING_ONLY_MODEL_KEYS),
        ("data", "datamodule_hyper_parameters", TRAINING_ONLY_DATA_KEYS),
    ):
        if stored_key not in checkpoint:
            continue  # e.g. a datamodule-less fit: nothing recorded to compare
        given_class, given = _section(config, section)
        trained_class, trained = _stored(checkpoint[stored_key])
        if given_class and trained_class and given_class != trained_class:
            differences.append(f"{section} is {given_class} (checkpoint: {trained_class})")
            continue
        for key in sorted(set(given) & set(trained) - ignored):
            if given[key] != trained[key]:
                differences.append(f"{section}.{key}={given[key]!r} (checkpoint: {trained[key]!r})")
    return differences


# ------------------------------------------------------------------------- aliases
@dataclass
class _Run:
    checkpoints: Path
    newest: Path
    state: dict[str, Any]


def _read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's plain entries (hyperparameters, callback states) without its tensors."""
    try:
        return read_checkpoint(path, verify=False)  # memory-mapped: no tensor data is read
    except UserInputError:  # damaged or foreign: such a run cannot be chosen
        return {}


def _monitored_best(state: Mapping[str, Any]) -> tuple[str, float, str, str] | None:
    """(best file name, score, monitor, mode) recorded by the monitored ModelCheckpoint."""
    for key, callback in state.get("callbacks", {}).items():
        if not key.startswith("ModelCheckpoint") or callback.get("monitor") is None:
            continue  # the last-checkpoint callback records a "best" too: its latest
        path, score = callback.get("best_model_path"), callback.get("best_model_score")
        if path and score is not None:
            mode = "min" if "'mode': 'min'" in key else "max"
            return Path(path).name, float(score), callback["monitor"], mode
    return None


def resolve_ckpt_alias(config: Namespace, subcommand: str) -> None:
    """Replaces ``ckpt_path: best|last`` by that checkpoint of the runs that fit the config."""
    alias = config.ckpt_path
    folders = _candidate_checkpoint_dirs(config)
    if not folders:
        if subcommand == "fit" and alias == "last":
            return  # Lightning's own "last": resume if the new run folder has one, else start
        raise UserInputError(
            f"ckpt_path {alias!r}: found no run with checkpoints in {describe_runs(config)}; "
            "train one with `fit` first or pass a checkpoint file"
        )
    fitting: list[_Run] = []
    skipped: list[str] = []
    for folder in folders:
        newest = max(folder.glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
        state = _read_meta(newest)
        differences = config_differences(config, state) if state else ["unreadable checkpoint"]
        if differences:
            skipped.append(f"{folder.parent}: {'; '.join(differences[:3])}")
        else:
            fitting.append(_Run(folder, newest, state))
    for line in skipped[:5]:
        say(f"ckpt_path {alias!r}: skipped run {line}")
    if len(skipped) > 5:
        say(f"ckpt_path {alias!r}: skipped {len(skipped) - 5} more runs of another config")
    if not fitting:
        raise UserInputError(
            f"ckpt_path {alias!r}: no run in {describe_runs(config)} was trained with this "
            f"model and data ({skipped[0]}); pass a checkpoint file or fix the config"
        )
    path, note = _best(fitting) if alias == "best" else _last(fitting, last_checkpoint_name(config))
    config.ckpt_path = str(path)
    say(f"ckpt_path {alias!r}: {path} (run {path.parent.parent}{note})")


def _best(runs: Iterable[_Run]) -> tuple[Path, str]:
    best: tuple[float, Path, str] | None = None
    for run in runs:
        recorded = _monitored_best(run.state)
        if recorded is None or not (run.checkpoints / recorded[0]).is_file():
            continue
        name, score, monitor, mode = recorded
        key = score if mode == "max" else -score
        if best is None or key > best[0]:
            best = (key, run.checkpoints / name, f", {monitor} {score:.4f}")
    if best is None:
        raise UserInputError(
            "ckpt_path 'best': no best checkpoint is recorded in these runs (is "
            "checkpoint.monitor set?); pass a checkpoint file or use 'last'"
        )
    return best[1], best[2]


def _last(runs: Iterable[_Run], name: str) -> tuple[Path, str]:
    lasts = [run.checkpoints / name for run in runs if (run.checkpoints / name).is_file()]
    if not lasts:
        raise UserInputError(
            f"ckpt_path 'last': no run of this config has a {name}; pass a checkpoint file"
        )
    path = max(lasts, key=lambda path: path.stat().st_mtime)
    state = _read_meta(path)
    return path, f", epoch {state.get('epoch')}, step {state.get('global_step')}"


# ---------------------------------------------------------------- resuming and outputs
def resume_existing_run(config: Namespace) -> None:
    """`fit` into a fixed run folder that already has a last checkpoint resumes from it.

    The folder is fixed by ``trainer.logger.init_args.version``: rerunning the same command
    after a kill, e.g. a requeued cluster job, continues the run instead of starting over on
    top of its checkpoints.
    """
    args = logger_args(config)
    if args is None or args.get("version") is None or config.trainer.get("fast_dev_run"):
        return
    version = args.version
    run = experiment_root(config) / (version if isinstance(version, str) else f"version_{version}")
    folder = (
        Path(config.checkpoint.dirpath) if config.checkpoint.get("dirpath") else run / "checkpoints"
    )
    last = folder / last_checkpoint_name(config)
    if last.is_file():
        config.ckpt_path = str(last)
        say(
            f"resuming from {last}: the run folder already has a last checkpoint (start a new "
            "run with another trainer.logger.init_args.version)"
        )


def resume_in_place(config: Namespace) -> None:
    """`fit` from ``<runs>/version_<n>/checkpoints/x.ckpt`` logs on into ``version_<n>``."""
    args = logger_args(config)
    if args is None or args.get("version") is not None:
        return
    run = run_folder_of(config.ckpt_path)
    if run is not None and run.parent == experiment_root(config).resolve():
        number = version_number(run)
        args.version = number if number is not None else run.name
        say(f"resuming into {run}")


def route_evaluation_outputs(config: Namespace, subcommand: str) -> None:
    """Logs, config and results of validate/test/predict go to a predictable folder.

    ``<run>/<command>/<checkpoint name>/`` for a checkpoint of a run folder; else
    ``<save_dir>/<name>/<command>/<checkpoint or init_from name>/``. Where that folder
    cannot be written (read-only storage), ``./runs/<command>/...``, then the system's temp
    folder, and a line says so.
    """
    args = logger_args(config)
    if args is None or args.get("version") is not None:
        return  # no run folder, or the user chose one
    source = config.get("ckpt_path") or config.model.get("init_args", Namespace()).get("init_from")
    label = Path(source).stem if source else "untrained"
    run = run_folder_of(source) if config.get("ckpt_path") else None
    wanted = (run if run is not None else experiment_root(config)) / subcommand
    for base in (
        wanted,
        Path("runs") / subcommand,
        Path(tempfile.gettempdir()) / "refiner_pl" / subcommand,
    ):
        target = base / label
        if _writable(target):
            break
    if base != wanted:
        say(f"{wanted} is not writable: the {subcommand} results go to {target}")
    args.save_dir, args.name, args.version = str(base), "", label


def _writable(folder: Path) -> bool:
    """Whether `folder` can be created and written, tested in its nearest existing ancestor
    (nothing is left behind: a failing command must not leave empty folders)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=existing):
            return True
    except OSError:
        return False


def report_fit_outputs(trainer: L.Trainer) -> None:
    """The run folder, the best checkpoint with its score, and the last checkpoint."""
    if trainer.fast_dev_run:
        return
    log_dir = trainer.log_dir if trainer.loggers else None  # a broadcast: every rank asks
    if trainer.global_rank != 0:
        return
    lines = []
    if log_dir:
        lines.append(f"run folder: {log_dir}")
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.monitor and callback.best_model_path:
            score = callback.best_model_score
            shown = f" ({callback.monitor} {float(score):.4f})" if score is not None else ""
            lines.append(f"best checkpoint: {callback.best_model_path}{shown}")
        elif not callback.monitor:
            latest = callback.best_model_path or callback.last_model_path
            if latest and f"last checkpoint: {latest}" not in lines:
                lines.append(f"last checkpoint: {latest}")
    for line in lines:
        say(line)


def warn_on_other_data(config: Namespace) -> None:
    """One line when the data of the command is not the data the checkpoint was trained on
    (its model settings are the checkpoint's anyway: LightningCLI restores them)."""
    differences = [
        line
        for line in config_differences(config, _read_meta(Path(config.ckpt_path)))
        if line.startswith("data")
    ]
    if differences:
        say(f"note: {config.ckpt_path} was trained on other data: {'; '.join(differences[:3])}")


def say_where_checkpoints_go(trainer: L.Trainer) -> None:
    """A line for every checkpoint folder outside the run folder (``checkpoint.dirpath``),
    or for every one when there is no run folder (``--trainer.logger false``)."""
    if trainer.fast_dev_run:
        return  # it writes no checkpoints
    run_dir = Path(trainer.log_dir).resolve() if trainer.loggers and trainer.log_dir else None
    folders = set()
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            if "://" not in str(callback.dirpath):
                folders.add(Path(callback.dirpath).resolve())
        elif run_dir is None:  # where ModelCheckpoint puts them without a logger
            folders.add(Path(trainer.default_root_dir, "checkpoints").resolve())
    for folder in sorted(folders):
        if run_dir is None:
            say(f"checkpoints go to {folder} (trainer.logger is off: no run folder)")
        elif not folder.is_relative_to(run_dir):
            say(f"checkpoints go to {folder}, outside the run folder {run_dir}")


# -------------------------------------------------------------------------- run lock
_HELD: list[RunLock] = []


class RunLock:
    """One live ``fit`` per run folder: ``<run>/.lock`` holds the host and pid of its owner.

    Taken with an exclusive create, so of two runs started into one folder exactly one gets
    it; the other stops with a line naming the owner. A heartbeat thread touches the file
    while the run lives. A lock is stale, and taken over, when its process is gone (same
    host) or its heartbeat is older than `STALE_SECONDS` (another host), so a requeue after a
    crash resumes. Released when ``fit`` ends, by `release_run_locks` (the CLI calls it on
    every exit) or at interpreter exit.
    """

    STALE_SECONDS = 120.0
    HEARTBEAT_SECONDS = 30.0

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".lock"
        self._made_folder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(3):
            try:
                with open(self.path, "x") as file:
                    json.dump(owner, file)
                break
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise UserInputError(self._busy_message(holder)) from None
                with_suppress_unlink(self.path)
        else:
            raise UserInputError(self._busy_message(self._holder()))
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        _HELD.append(self)
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with_suppress_unlink(self.path)
            if self._made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run that failed before writing anything
        if self in _HELD:
            _HELD.remove(self)

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
            holder["age"] = time.time() - self.path.stat().st_mtime
            return holder
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:  # unreadable: being written right now, or damaged
            try:
                return time.time() - self.path.stat().st_mtime > self.STALE_SECONDS
            except OSError:
                return True
        if holder.get("host") == socket.gethostname():
            return holder.get("pid") == os.getpid() or not _alive(int(holder.get("pid", -1)))
        return holder.get("age", 0.0) > self.STALE_SECONDS

    def _busy_message(self, holder: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return (
            f"run folder {self.path.parent} is in use by another fit (pid {holder.get('pid')} "
            f"on {holder.get('host')}, since {since}): wait for it to end or stop it, or start "
            "a new run with another trainer.logger.init_args.version"
        )


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def with_suppress_unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def release_run_locks() -> None:
    for lock in list(_HELD):
        lock.release()


atexit.register(release_run_locks)

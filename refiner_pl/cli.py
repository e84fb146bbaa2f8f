"""`RefinerCLI`: the LightningCLI behind ``python cli.py {fit,validate,test,predict}``.

Beyond stock LightningCLI it

* links ``data.num_classes`` / ``data.img_size`` into the model, so they are never typed twice;
* adds configurable ``checkpoint`` (best by ``val/acc1``), ``last_checkpoint``
  (``last.ckpt``, every epoch), ``step_checkpoint`` (the same file every 1000 steps) and
  ``lr_monitor`` sections, and logs with TensorBoard to ``runs/<name>/version_<n>/``
  (checkpoints in its ``checkpoints/`` folder; a log line names any checkpoint folder
  outside it); saves checkpoints atomically and loads them with ``weights_only=True``
  (`refiner_pl.checkpoint_io`);
* adds a ``nonfinite_loss`` section: a NaN/inf training loss stops the run with one
  ``error:`` line before the step is taken, or skips the step (`NonFiniteLoss`);
* adds a ``cpu_memory`` section: on a CPU run glibc's malloc keeps freed memory for reuse
  instead of faulting in fresh pages for every large tensor (`KeepFreedMemory`);
* adds an optional ``ema`` section, the `refiner_pl.callbacks.EMA` weight average (null, the
  default, disables it); ``validate``/``test``/``predict`` with ``--ckpt_path`` score the
  checkpoint's EMA weights while ``ema.validate_ema`` is true and the raw weights with
  ``--ema.validate_ema false`` (or ``--ema null``);
* adds an optional ``attention`` section, the `refiner_pl.callbacks.AttentionMonitor`
  (attention-diversity metrics and maps in TensorBoard; null, the default, disables it);
* resolves ``--ckpt_path best`` / ``last`` to the newest run under that folder, also in a new
  process (stock Lightning only knows "best" right after ``fit`` in the same process), and
  resumes ``fit --ckpt_path ...`` inside the run folder it came from; ``fit`` into a fixed
  run folder (``trainer.logger.init_args.version``) that has a last checkpoint resumes it;
* reports every bad option, config value or `UserInputError` as one ``error: ...`` line
  (exit status 2) instead of a usage dump or a traceback.

Checkpoints define the model: with ``--ckpt_path`` Lightning replaces the ``model`` arguments
by the hyperparameters stored in the checkpoint (the weights only fit the architecture they
were trained with). A warning names every given model value that was replaced this way.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from refiner_pl.callbacks import (
    EMA,
    AttentionMonitor,
    EvaluationResults,
    KeepFreedMemory,
    NonFiniteLoss,
    PredictionWriter,
    has_ema_weights,
)
from refiner_pl.checkpoint_io import AtomicCheckpointIO, check_lightning_checkpoint
from refiner_pl.data import ClassificationDataModule
from refiner_pl.errors import UserInputError, reporting_user_errors
from refiner_pl.module import ImageClassifier

CKPT_ALIASES = ("best", "last")
LINKED = ("num_classes", "img_size")  # model arguments that come from the datamodule


class RefinerArgumentParser(LightningArgumentParser):
    """Reports a bad option or config value as a single ``error: ...`` line (exit status 2).

    Set the environment variable ``JSONARGPARSE_DEBUG=true`` for jsonargparse's full report.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or "JSONARGPARSE_DEBUG" in os.environ:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {one_line(message)} (see: {prog} --help)\n")
        self.exit(2)


class RefinerCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` models and `ClassificationDataModule` data.

    Both are chosen by ``class_path`` in the config (subclasses included); for the model it
    may be left out, e.g. ``--model.model_name refiner_vit_tiny``.
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        defaults: dict[str, Any] = {
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "seed_everything_default": 42,
            # resuming writes into the run folder it came from, config.yaml included
            "save_config_kwargs": {"overwrite": True},
            # the module builds its own optimizer and schedule from typed hyperparameters
            "auto_configure_optimizers": False,
            "parser_class": RefinerArgumentParser,
        }
        super().__init__(ImageClassifier, ClassificationDataModule, args=args, **defaults | kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        # Best checkpoint by val/acc1 and, separately, the latest one as last.ckpt: since
        # Lightning 2.6 `save_last` only copies a checkpoint that top-k saved, so with
        # save_top_k=1 last.ckpt would stay at the best epoch and resuming would go back.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.filename": "epoch={epoch}-val_acc1={val/acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        # Within epochs too: the same last.ckpt every 1000 optimizer steps (0: only after
        # epochs), so a killed run loses at most that much work. A second callback, as one
        # ModelCheckpoint cannot save on both a step and an epoch interval.
        parser.add_lightning_class_args(ModelCheckpoint, "step_checkpoint")
        parser.set_defaults(
            {
                "step_checkpoint.monitor": None,
                "step_checkpoint.save_top_k": 1,
                "step_checkpoint.enable_version_counter": False,
                "step_checkpoint.every_n_train_steps": 1000,
            }
        )
        for key in ("dirpath", "filename"):
            parser.link_arguments(f"last_checkpoint.{key}", f"step_checkpoint.{key}")
        # A NaN/inf training loss stops the run (`--nonfinite_loss.action skip` skips the step).
        parser.add_lightning_class_args(NonFiniteLoss, "nonfinite_loss")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        # CPU runs keep freed memory for reuse (`--cpu_memory.enabled false` leaves malloc be)
        parser.add_lightning_class_args(KeepFreedMemory, "cpu_memory")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # Optional, so not one of the parser's `callback_keys` (those must not be null):
        # instantiate_trainer adds it. `--ema.decay 0.99996` alone enables it (class_path
        # defaults to EMA), `--ema null` disables it.
        parser.add_subclass_arguments(EMA, "ema", required=False, fail_untyped=False)
        # The same for the attention metrics: `--attention.every_n_epochs 1` enables them.
        parser.add_subclass_arguments(
            AttentionMonitor, "attention", required=False, fail_untyped=False
        )
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    # runs/<name>/version_<n>/{checkpoints/,config.yaml,events...}
                    "init_args": {
                        "save_dir": "runs",
                        "name": "default",
                        "default_hp_metric": False,
                    },
                }
            }
        )

    # ------------------------------------------------------------------- checkpoint paths
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if subcommand == "fit" and config.get("ckpt_path") is None:
            _resume_existing_run(config)
        if config.get("ckpt_path") in CKPT_ALIASES:
            _resolve_ckpt_alias(config, subcommand)
        if config.get("ckpt_path") not in (None, *CKPT_ALIASES):
            # One clear line for a missing, damaged or foreign file, or one that would run
            # code when unpickled, before LightningCLI reads its hyperparameters.
            check_lightning_checkpoint(str(config.ckpt_path))
            if subcommand == "fit":
                _resume_in_place(config)
        # What the user asked for, to tell them which values the checkpoint replaces.
        model = config.get("model")
        self._given_model_args = dict(vars(model.init_args)) if model else {}

    def before_instantiate_classes(self) -> None:
        if not self.subcommand or not self.config[self.subcommand].get("ckpt_path"):
            return
        restored = vars(self.config[self.subcommand].model.init_args)
        if restored.get("init_from") is not None:
            # The checkpoint's weights replace whatever init_from would load.
            rank_zero_info(
                f"ckpt_path given: model.init_from {restored['init_from']} is not loaded"
            )
            self.config[self.subcommand].model.init_args.init_from = None
            self._given_model_args.pop("init_from", None)
        replaced = [
            f"model.{key}={given!r} -> {restored[key]!r}"
            for key, given in self._given_model_args.items()
            if key in restored and key not in LINKED and restored[key] != given
        ]
        if replaced:
            rank_zero_warn(
                "ckpt_path: the checkpoint's hyperparameters replace the given model arguments "
                f"({', '.join(replaced)}); the weights only fit the model they were trained with"
            )
        self._ckpt_linked_args = {key: restored.get(key) for key in LINKED}

    def after_instantiate_classes(self) -> None:
        # Linked values come from the datamodule and win over the checkpoint's: a mismatch
        # would only surface later as a state_dict shape error.
        for key, trained in getattr(self, "_ckpt_linked_args", {}).items():
            current = self.model.hparams.get(key)
            if trained is not None and current is not None and trained != current:
                raise UserInputError(
                    f"the checkpoint's model was trained with {key}={trained} but the datamodule "
                    f"gives {key}={current}; use the data it was trained on (data.{key}={trained})"
                )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, with the ``attention`` and ``ema`` callbacks (when configured) after
        trainer.callbacks; attention before ema, so it sees the weights validation scored.
        Checkpoints are saved atomically (`AtomicCheckpointIO`) unless trainer.plugins
        brings another CheckpointIO."""
        config = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        plugins = config.trainer.get("plugins")
        plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        optional = [config.get(key) for key in ("attention", "ema") if config.get(key)]
        if optional:
            configured = config.trainer.get("callbacks")
            if configured is None:
                configured = []
            elif not isinstance(configured, list):
                configured = [configured]
            kwargs["callbacks"] = [*configured, *optional, *kwargs.get("callbacks", [])]
        return super().instantiate_trainer(**kwargs)

    # ----------------------------------------------------------------------- fit checks
    def before_fit(self) -> None:
        """Catches a schedule, batch or lr that cannot work before any folder is written."""
        trainer, hp = self.trainer, self.model.hparams
        batch_size = getattr(self.datamodule, "batch_size", None)
        if isinstance(batch_size, int) and isinstance(self.model, ImageClassifier):
            self.model.check_batch_size(batch_size)  # mixup needs an even batch
            # lr_base_size: an lr scaled below min_lr
            self.model.scaled_lr(batch_size * trainer.world_size * trainer.accumulate_grad_batches)
        if not trainer.loggers:  # --trainer.logger false: nothing to log the lr to
            trainer.callbacks = [
                c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)
            ]
        _say_where_checkpoints_go(trainer)
        if trainer.fast_dev_run or trainer.max_steps != -1 or hp.get("sched") == "none":
            return
        epochs = trainer.max_epochs
        span = hp.get("warmup_epochs", 0) + hp.get("cooldown_epochs", 0)
        if epochs is not None and 0 < epochs <= span:
            raise UserInputError(
                f"model.warmup_epochs + model.cooldown_epochs ({span:g}) leave no epoch for the "
                f"schedule in trainer.max_epochs={epochs}; raise max_epochs or shorten warmup"
            )

    def before_validate(self) -> None:
        self._check_ema_weights()
        self._add_results_writer()

    def before_test(self) -> None:
        self._check_ema_weights()
        self._add_results_writer()

    def _add_results_writer(self) -> None:
        """`validate`/`test` also write their scores as JSON, with the resolved config."""
        if any(isinstance(cb, EvaluationResults) for cb in self.trainer.callbacks):
            return
        dumped = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        self.trainer.callbacks.append(EvaluationResults(config=yaml.safe_load(dumped)))

    def _check_ema_weights(self) -> None:
        """Scoring EMA weights needs a checkpoint that has them: say so before any work."""
        ema = next((c for c in self.trainer.callbacks if isinstance(c, EMA)), None)
        if ema is None or not ema.validate_ema:
            return
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            return  # a URL or a missing file: Lightning's own loading reports it
        if ckpt_path is None or not has_ema_weights(ckpt_path):
            where = f"checkpoint {ckpt_path} has none" if ckpt_path else "no --ckpt_path given"
            raise UserInputError(
                f"ema.validate_ema is true but there are no EMA weights to score ({where}): "
                "pass a checkpoint trained with the ema section, or score the raw weights "
                "with --ema.validate_ema false"
            )

    def before_predict(self) -> None:
        self._check_ema_weights()
        if not is_overridden("predict_dataloader", self.datamodule, L.LightningDataModule):
            raise UserInputError(
                f"{type(self.datamodule).__name__} defines no predict_dataloader(); choose a "
                "datamodule with one, or use `test` for labelled data"
            )
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())


def main(args: ArgsType = None) -> None:
    """Entry point of ``cli.py``; a `UserInputError` becomes one ``error:`` line, exit 2."""
    with reporting_user_errors():
        RefinerCLI(args=args)


# ------------------------------------------------------------------------------ helpers
def _resolve_ckpt_alias(config: Namespace, subcommand: str) -> None:
    """Replaces ``ckpt_path: best|last`` by that checkpoint of the newest run with one."""
    alias = config.ckpt_path
    ckpt_dir = _checkpoint_dir(config)
    if ckpt_dir is None:
        if subcommand == "fit" and alias == "last":
            return  # Lightning's own "last": resume if the new run folder has one, else start
        raise UserInputError(
            f"ckpt_path {alias!r}: found no run with checkpoints in {_describe_runs(config)}; "
            "train one with `fit` first or pass a checkpoint file"
        )
    if alias == "last":
        path = ckpt_dir / f"{config.last_checkpoint.filename or 'last'}.ckpt"
        if not path.is_file():
            raise UserInputError(
                f"ckpt_path 'last': {ckpt_dir} has no {path.name}; pass a checkpoint file"
            )
    else:
        path = _best_checkpoint(ckpt_dir)
    config.ckpt_path = str(path)
    rank_zero_info(f"ckpt_path {alias!r} resolved to {path}")


def _resume_existing_run(config: Namespace) -> None:
    """`fit` into a fixed run folder that already has a last checkpoint resumes from it.

    The folder is fixed by ``trainer.logger.init_args.version``: rerunning the same command
    after a kill, e.g. a requeued cluster job, continues the run instead of starting over on
    top of its checkpoints.
    """
    args = _logger_args(config)
    if args is None or args.get("version") is None or config.trainer.get("fast_dev_run"):
        return
    ckpt_dir = _checkpoint_dir(config)
    last = ckpt_dir / f"{config.last_checkpoint.filename or 'last'}.ckpt" if ckpt_dir else None
    if last is not None and last.is_file():
        config.ckpt_path = str(last)
        rank_zero_info(
            f"resuming from {last}: the run folder already has a last checkpoint (start a new "
            "run with another trainer.logger.init_args.version)"
        )


def _say_where_checkpoints_go(trainer: L.Trainer) -> None:
    """A log line for every checkpoint folder outside the run folder (``checkpoint.dirpath``),
    or for every one when there is no run folder (``--trainer.logger false``)."""
    if trainer.fast_dev_run:
        return  # it writes no checkpoints
    run_dir = Path(trainer.log_dir).resolve() if trainer.loggers and trainer.log_dir else None
    folders = set()
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is not None:
            if "://" not in str(dirpath):
                folders.add(Path(dirpath).resolve())
        elif run_dir is None:  # where ModelCheckpoint puts them without a logger
            folders.add(Path(trainer.default_root_dir, "checkpoints").resolve())
    for folder in sorted(folders):
        if run_dir is None:
            rank_zero_info(f"checkpoints go to {folder} (trainer.logger is off: no run folder)")
        elif not folder.is_relative_to(run_dir):
            rank_zero_info(f"checkpoints go to {folder}, outside the run folder {run_dir}")


def _resume_in_place(config: Namespace) -> None:
    """`fit` from ``<runs>/version_<n>/checkpoints/x.ckpt`` logs on into ``version_<n>``."""
    logger_args = _logger_args(config)
    if logger_args is None or logger_args.get("version") is not None:
        return
    ckpt = Path(config.ckpt_path).resolve()
    run = ckpt.parent.parent
    if (
        ckpt.parent.name == "checkpoints"
        and run.parent == _runs_root(config).resolve()
        and _version_number(run) is not None
    ):
        logger_args.version = _version_number(run)
        rank_zero_info(f"resuming into {run}")


def _logger_args(config: Namespace) -> Namespace | None:
    """init_args of the (first) logger when it writes under a save_dir, as TensorBoard does."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace):
        if logger.init_args.get("save_dir"):
            return logger.init_args
    return None


def _runs_root(config: Namespace) -> Path:
    args = _logger_args(config)
    assert args is not None
    return Path(args.save_dir) / (args.get("name") or "")


def _version_number(run: Path) -> int | None:
    number = run.name.removeprefix("version_")
    return int(number) if run.name.startswith("version_") and number.isdigit() else None


def _describe_runs(config: Namespace) -> str:
    if config.checkpoint.get("dirpath"):
        return str(config.checkpoint.dirpath)
    return f"{_runs_root(config)}/version_*/checkpoints"


def _checkpoint_dir(config: Namespace) -> Path | None:
    """Checkpoint folder of the newest run that has a checkpoint (None if there is none)."""
    if config.checkpoint.get("dirpath"):
        runs = [Path(config.checkpoint.dirpath)]
    else:
        args = _logger_args(config)
        if args is None:
            raise UserInputError(
                "ckpt_path 'best'/'last' needs a logger with a save_dir (trainer.logger) or "
                "checkpoint.dirpath to find the runs; pass a checkpoint file instead"
            )
        root, version = _runs_root(config), args.get("version")
        if version is not None:  # a fixed run folder: look only there
            runs = [root / (version if isinstance(version, str) else f"version_{version}")]
        else:
            numbered = [(_version_number(run), run) for run in root.glob("version_*")]
            runs = [run for number, run in sorted(numbered, reverse=True) if number is not None]
        runs = [run / "checkpoints" for run in runs]
    return next((run for run in runs if any(run.glob("*.ckpt"))), None)


def _best_checkpoint(ckpt_dir: Path) -> Path:
    """The best checkpoint recorded by ModelCheckpoint in the newest file of `ckpt_dir`."""
    newest = max(ckpt_dir.glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    state = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
    for key, callback in state.get("callbacks", {}).items():
        if not key.startswith("ModelCheckpoint") or callback.get("monitor") is None:
            continue  # the last_checkpoint callback also records a "best" path: its latest
        best = Path(callback.get("best_model_path") or "").name
        if best and (ckpt_dir / best).is_file():
            return ckpt_dir / best
    raise UserInputError(
        f"ckpt_path 'best': no best checkpoint recorded in {ckpt_dir} (is checkpoint.monitor "
        "set?); pass a checkpoint file or use 'last'"
    )


def one_line(message: str) -> str:
    """Condenses jsonargparse's nested multi-line report to ``key.path: first reason``."""
    keys: list[str] = []
    reason = given = None
    for raw in message.splitlines():
        line = raw.strip().lstrip("-").strip()
        match = re.match(r'Parser key "([^"]+)":\s*(.*)$', line)
        if match and reason is None:
            keys.append(match.group(1))
            reason = match.group(2) or None
        elif line.startswith("Given value:"):
            given = given or line.removeprefix("Given value:").strip()
        elif line and reason is None and not line.startswith(_NOISE):
            reason = line
    if not keys:
        return " ".join(message.split())
    text = f"{'.'.join(keys)}: {reason or 'invalid value'}"
    if given and "Got value" not in text and not given.startswith(("NestedArg(", "{", "[")):
        text += f" (got {given!r})"
    return text


_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)

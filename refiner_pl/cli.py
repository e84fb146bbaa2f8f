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

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from refiner_pl import runs
from refiner_pl.callbacks import (
    EMA,
    AttentionMonitor,
    EvaluationResults,
    KeepFreedMemory,
    NonFiniteLoss,
    PreciseBN,
    PredictionWriter,
)
from refiner_pl.callbacks.preemption import PreemptionCheckpoint, preemption_signal
from refiner_pl.checkpoint_io import (
    AtomicCheckpointIO,
    check_lightning_checkpoint,
    has_ema_weights,
)
from refiner_pl.data import ClassificationDataModule
from refiner_pl.errors import UserInputError, first_line, reporting_user_errors
from refiner_pl.module import ImageClassifier
from refiner_pl.parser import RefinerArgumentParser

LINKED = ("num_classes", "img_size")  # model arguments that come from the datamodule


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
        # BatchNorm statistics recomputed for the weights before every validation
        parser.add_lightning_class_args(PreciseBN, "precise_bn")
        # SIGTERM/SIGUSR1 (pre-emption): save last.ckpt at this step, exit 128 + signal
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
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
            runs.resume_existing_run(config)
        if config.get("ckpt_path") in runs.CKPT_ALIASES:
            runs.resolve_ckpt_alias(config, subcommand)
        if config.get("ckpt_path") not in (None, *runs.CKPT_ALIASES):
            # One clear line for a missing, damaged or foreign file, or one that would run
            # code when unpickled, before LightningCLI reads its hyperparameters.
            check_lightning_checkpoint(str(config.ckpt_path))
            runs.warn_on_other_data(config)
            if subcommand == "fit":
                runs.resume_in_place(config)
        if subcommand in runs.EVALUATION_COMMANDS:
            runs.route_evaluation_outputs(config, subcommand)
            # the checkpoint callbacks of an evaluation write nothing: their folder is moot
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
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
        # Evaluation does not use the recipe: only a replaced network setting is worth a line.
        moot = runs.TRAINING_ONLY_MODEL_KEYS if self.subcommand != "fit" else frozenset()
        replaced = [
            f"model.{key}={given!r} -> {restored[key]!r}"
            for key, given in self._given_model_args.items()
            if key in restored and key not in (*LINKED, *moot) and restored[key] != given
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
                hint = (
                    f"a dataset with {trained} classes"
                    if key == "num_classes"
                    else f"--data.{key} {trained}"
                )
                raise UserInputError(
                    f"the checkpoint's model was trained with {key}={trained} but the datamodule "
                    f"gives {key}={current}; use the data it was trained on ({hint})"
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
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # e.g. a GPU config without a GPU
            accelerator = config.trainer.get("accelerator")
            hint = "fix the trainer section"
            if accelerator not in (None, "auto", "cpu") and not torch.cuda.is_available():
                hint = (
                    "this machine has no GPU: use --trainer configs/trainer/cpu.yaml "
                    "(or --trainer.accelerator cpu --trainer.precision 32-true)"
                )
            raise UserInputError(
                f"trainer.accelerator {accelerator!r}: {first_line(err)}; {hint}"
            ) from None

    # ----------------------------------------------------------------------- fit checks
    def before_fit(self) -> None:
        """Catches a batch or lr that cannot work before any folder is written, then takes the
        run folder's lock (one live run per folder)."""
        trainer = self.trainer
        batch_size = getattr(self.datamodule, "batch_size", None)
        if isinstance(batch_size, int) and isinstance(self.model, ImageClassifier):
            self.model.check_batch_size(batch_size)  # mixup needs an even batch
            # lr_base_size: an lr scaled below min_lr
            self.model.scaled_lr(batch_size * trainer.world_size * trainer.accumulate_grad_batches)
        if not trainer.loggers:  # --trainer.logger false: nothing to log the lr to
            trainer.callbacks = [
                c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)
            ]
        runs.say_where_checkpoints_go(trainer)
        if trainer.loggers and trainer.log_dir and trainer.global_rank == 0:
            runs.RunLock(trainer.log_dir).acquire()

    def after_fit(self) -> None:
        runs.report_fit_outputs(self.trainer)
        runs.release_run_locks()

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
    """Entry point of ``cli.py``: a `UserInputError`, a full disk or read-only storage becomes
    one ``error:`` line (exit 2); a pre-emption signal, a saved last checkpoint and exit
    status 128 + signal, as a killed process has."""
    quiet_routine_noise()
    try:
        with reporting_user_errors():
            RefinerCLI(args=args)
    except SIGTERMException:
        raise SystemExit(128 + preemption_signal()) from None
    finally:
        runs.release_run_locks()


def quiet_routine_noise() -> None:
    """Drops dependency chatter a user can do nothing about: Lightning's product tips and
    deprecation notices raised inside the libraries themselves."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lightning|torch|timm)\.")
    warnings.filterwarnings("ignore", message=r".*is deprecated", module=r"lightning\.")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)

"""Shared by the test modules (pytest puts tests/ on the path): paths, CLI arguments, a quiet
Trainer, and `cli.py` run in this process or, where the process boundary is the point, in a
fresh interpreter."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from refiner_pl import cli
from refiner_pl.data import DigitsDataModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CLI = str(REPO / "cli.py")
QUICKSTART = str(CONFIGS / "quickstart.yaml")
RELEASE_FIXTURE = REPO / "tests" / "fixtures" / "official_refiner_tiny.pt"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# A short real run: 3 train batches per epoch, full validation.
SHORT = ["--trainer.limit_train_batches", "3", "--model.warmup_epochs", "0.5", *QUIET]
# Environment variables a CLI run sets (seed_everything); a fresh process starts without them.
_RUN_ENVIRONMENT = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def imagenet_recipe(preset: str) -> list[str]:
    """The ``--config`` arguments of an ImageNet recipe: the shared base, then the preset."""
    overlay = CONFIGS / "imagenet" / f"{preset}.yaml"
    return ["--config", str(CONFIGS / "imagenet" / "base.yaml"), "--config", str(overlay)]


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@dataclass
class CliResult:
    """What a `cli.py` run left: its exit status and output. In-process runs add the log
    records and warnings to `stderr`, where a separate process prints them."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        assert "Traceback" not in self.stderr, self.stderr
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    @property
    def error(self) -> str:
        """The one ``error:`` line of a run that failed on bad input (exit status 2)."""
        assert self.exit_code == 2, self.stderr[-3000:]
        lines = self.error_lines
        assert len(lines) == 1, self.stderr[-3000:]
        return lines[0]

    def check(self) -> CliResult:
        """This result, after asserting that the run succeeded."""
        assert self.exit_code == 0, self.stderr[-3000:]
        return self


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _as_a_fresh_process(cwd: Path) -> Iterator[None]:
    """Runs the body in `cwd`, without the variables a run sets, and puts back afterwards the
    process-wide settings a run changes (working directory, environment, torch threads and
    deterministic mode)."""
    before_cwd, threads = os.getcwd(), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    environment = {name: os.environ.pop(name, None) for name in _RUN_ENVIRONMENT}
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before_cwd)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        for name, value in environment.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def run_cli_in_process(*args: str, cwd: Path) -> CliResult:
    """``python cli.py ARGS`` in `cwd`, in this process: `refiner_pl.cli.main`, with its
    ``SystemExit`` caught and its output, log records and warnings captured."""
    stdout, stderr, records = io.StringIO(), io.StringIO(), _Lines()
    # where records end up: the root logger, and those that keep theirs (Lightning's)
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    for logger in loggers:
        logger.addHandler(records)
    exit_code = 0
    try:
        with (
            _as_a_fresh_process(cwd),
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            warnings.simplefilter("always")
            try:
                cli.main(list(args))
            except SystemExit as exit_:
                code = exit_.code
                exit_code = code if isinstance(code, int) else 0 if code is None else 1
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    logged = [*records.lines, *(str(w.message) for w in caught)]
    return CliResult(exit_code, stdout.getvalue(), stderr.getvalue() + "\n".join(logged))


def run_cli_subprocess(*args: str, cwd: Path, env: dict[str, str] | None = None) -> CliResult:
    """``python cli.py ARGS`` in a fresh interpreter: only for tests where the process
    boundary is the point (a kill, DDP, torchrun, the allocator)."""
    result = subprocess.run(
        [sys.executable, CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    return CliResult(result.returncode, result.stdout, result.stderr)


def logged_metric(stdout: str, key: str) -> float:
    """A value from the results table Lightning prints after validate/test."""
    match = re.search(rf"^\s*{re.escape(key)}\s+([0-9.eE+-]+)\s*$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


class DigitsWithNaN(DigitsDataModule):
    """The digits with one training image of NaNs, as a damaged float input would be
    (``--data helpers.DigitsWithNaN``)."""

    def __init__(
        self, nan_index: int = 0, img_size: int = 32, batch_size: int = 64, num_workers: int = 0
    ) -> None:
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers)
        self.nan_index = nan_index

    def _build_split(self, split):
        dataset = super()._build_split(split)
        if split == "train":
            dataset.images = dataset.images.clone()
            dataset.images[self.nan_index] = float("nan")
        return dataset

"""`EvaluationResults`: the scores of ``python cli.py validate|test`` as a JSON file."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from refiner_pl.callbacks.ema import EMA

# JSON name -> metric name after the stage prefix, as ImageClassifier logs them.
HEADLINE = {"top1": "acc1", "top5": "acc5", "loss": "loss"}


class EvaluationResults(Callback):
    """Writes ``<log_dir>/{validate,test}_results.json`` when a validate/test run ends.

    The file holds ``top1``, ``top5`` and ``loss`` (null when not logged), every metric of
    the stage under ``metrics``, the number of ``images`` scored (summed over ranks), the
    ``checkpoint`` and whether its EMA weights were scored, the ``model`` name and the
    resolved ``config``. Validation inside ``fit`` writes nothing.

    Args:
        config: The run's resolved configuration, stored as given.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config
        self.images = 0
        self.path: Path | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.images = 0

    on_test_start = on_validation_start

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.images += len(batch[0])

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate", "val/")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test", "test/")

    def _write(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, prefix: str
    ) -> None:
        count = torch.tensor(self.images, device=pl_module.device, dtype=torch.long)
        images = int(trainer.strategy.reduce(count, reduce_op="sum"))  # every rank takes part
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: all ranks
        if trainer.global_rank != 0:
            return
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(prefix)
        }
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
        results = {
            **{name: metrics.get(prefix + key) for name, key in HEADLINE.items()},
            "images": images,
            "metrics": metrics,
            "checkpoint": trainer.ckpt_path,
            "ema_weights": bool(ema is not None and ema.validate_ema and trainer.ckpt_path),
            "model": pl_module.hparams.get("model_name"),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{stage}_results.json"
        self.path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"{stage} results: {self.path}")

"""`PredictionWriter`: what ``python cli.py predict`` writes into the run's log folder."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

SHOWN_SKIPPED = 20  # skipped files listed on the console; all of them go to a file


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (top-k classes per image) and ``predictions.pt`` (all probs).

    One CSV row per image, in file (or dataset) order: ``file``, then for the val split the
    ``target`` and ``target_name``, then ``top1_index``, ``top1_name``, ``top1_prob`` ...
    up to ``top{k}_*``. Class names come from the datamodule's ``class_names`` (ImageNet
    wnids become readable names there). ``predictions.pt`` holds ``probs`` (N, num_classes),
    ``files`` and ``class_names``. Files of a ``predict_dir`` that could not be decoded are
    listed on the console and in ``predictions_skipped.csv``. Under DDP the ranks' rows are
    gathered and rank 0 writes one set of files (without the sampler's padding repeats).

    Args:
        top_k: Classes per row (at most the number of classes).
    """

    def __init__(self, top_k: int = 5) -> None:
        super().__init__(write_interval="epoch")
        self.top_k = top_k
        self.csv_path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        # Per dataloader: `batch_indices` always, `predictions` only when there are several.
        if predictions and isinstance(predictions[0], list):
            predictions = predictions[0]
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else []
        dataset = _predict_dataset(trainer)
        rows, skipped = _collect(predictions, indices, dataset)
        rows, skipped = _gather(rows), _gather(skipped)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: all ranks
        if trainer.global_rank != 0:
            return
        rows = sorted({key: row for key, row in rows}.items())  # ranks may repeat samples
        skipped = sorted(set(skipped))
        class_names = getattr(trainer.datamodule, "class_names", None)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = out_dir / "predictions.csv"
        files = [row[0] for _, row in rows]
        probs = (
            torch.stack([row[2] for _, row in rows])
            if rows
            else torch.empty(0, pl_module.hparams.get("num_classes", 0))
        )
        targets = [row[1] for _, row in rows]
        _write_csv(self.csv_path, files, targets, probs, class_names, self.top_k)
        torch.save(
            {"probs": probs, "files": files, "class_names": class_names},
            out_dir / "predictions.pt",
        )
        print(f"predictions: {len(files)} images -> {self.csv_path}")
        if skipped:
            _report_skipped(skipped, out_dir / "predictions_skipped.csv", len(files))


def _predict_dataset(trainer: L.Trainer) -> Any:
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


def _collect(
    predictions: list, indices: list, dataset: Any
) -> tuple[list[tuple[int, tuple]], list[tuple[str, str]]]:
    """(order key, (file, target, probs)) rows and (file, reason) of undecodable files."""
    rows: list[tuple[int, tuple]] = []
    skipped: list[tuple[str, str]] = []
    names = _file_names(dataset)
    file_order = {name: i for i, name in enumerate(names)}
    targets = getattr(dataset, "targets", None)
    for batch_number, output in enumerate(predictions):
        if isinstance(output, dict):  # a predict_dir batch
            skipped += [tuple(item) for item in output["failed"]]
            for file, probs in zip(output["files"], output["probs"].float().cpu(), strict=True):
                rows.append((file_order.get(file, len(file_order)), (file, None, probs)))
            continue
        batch = indices[batch_number] if batch_number < len(indices) else []
        for index, probs in zip(batch, output.float().cpu(), strict=True):
            file = names[index] if names else str(index)
            target = int(targets[index]) if targets is not None else None
            rows.append((index, (file, target, probs)))
    return rows, skipped


def _file_names(dataset: Any) -> list[str]:
    """File names of a predict_dir listing or an ImageFolder (relative to its root)."""
    if hasattr(dataset, "files"):
        return [path.relative_to(dataset.root).as_posix() for path in dataset.files]
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):
        return [Path(path).relative_to(dataset.root).as_posix() for path, _ in dataset.samples]
    return []


def _gather(items: list) -> list:
    """Every rank's `items`, concatenated (the list itself outside a distributed run)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part or []]


def _write_csv(
    path: Path,
    files: list[str],
    targets: list[int | None],
    probs: torch.Tensor,
    class_names: list[str] | None,
    top_k: int,
) -> None:
    k = min(top_k, probs.shape[1]) if probs.ndim == 2 else 0
    names = class_names or [str(i) for i in range(probs.shape[1] if probs.ndim == 2 else 0)]
    with_targets = any(target is not None for target in targets)
    header = ["file"] + (["target", "target_name"] if with_targets else [])
    for rank in range(1, k + 1):
        header += [f"top{rank}_index", f"top{rank}_name", f"top{rank}_prob"]
    top_probs, top_indices = probs.topk(k, dim=-1) if len(files) else (probs, probs)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, file in enumerate(files):
            row: list[Any] = [file]
            if with_targets:
                row += [targets[i], names[targets[i]]]
            for index, prob in zip(top_indices[i].tolist(), top_probs[i].tolist(), strict=True):
                row += [index, names[index], f"{prob:.6f}"]
            writer.writerow(row)


def _report_skipped(skipped: list[tuple[str, str]], path: Path, good: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    print(f"skipped {len(skipped)} of {len(skipped) + good} files that are not readable images:")
    for file, reason in skipped[:SHOWN_SKIPPED]:
        print(f"  {file}: {reason}")
    if len(skipped) > SHOWN_SKIPPED:
        print(f"  ... and {len(skipped) - SHOWN_SKIPPED} more")
    print(f"the full list: {path}")

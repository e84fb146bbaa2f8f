"""`PreciseBN`: BatchNorm running statistics recomputed for the weights being evaluated.

During training a BatchNorm's running mean and variance are an exponential average over the
last ~``1/momentum`` batches, computed with the weights each of those batches saw. While the
weights move fast (early epochs, short fine-tunes) the average lags them, and evaluation, which
uses the running statistics, scores a network that never existed: the quickstart's val/acc1
after two epochs read 0.33 with the lagging statistics and 0.89 with recomputed ones.

Precise BN (He et al., "Rethinking ImageNet Pre-training"; fvcore/detectron2
``update_bn_stats``; torch's ``swa_utils.update_bn``) recomputes them as a plain average over N
training batches with the current weights, before every validation and before a checkpoint is
written, so the scores, the "best" checkpoint and the saved statistics all describe the
weights. ``swa_utils.update_bn`` itself is not used: it switches the whole network to training
mode, so stochastic depth and dropout would shape the statistics that evaluation (which runs
without them) then uses, and it resets ``num_batches_tracked``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.layers import DropPath
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from refiner_pl.callbacks.ema import EMA
from refiner_pl.data.resume import SeededSamples
from refiner_pl.errors import UserInputError
from refiner_pl.seeding import derive_seed, derive_seeds, global_seed

_STREAM = 0x9B  # a key of its own, so these draws never repeat a training step's

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, DropPath)


class PreciseBN(L.Callback):
    """Recomputes every BatchNorm's running statistics on training batches before validation.

    Args:
        enabled: recompute (a network without BatchNorm is left alone either way).
        num_batches: training batches per device to average over (fewer if an epoch has
            fewer); the batches are a seeded draw from the train split with its training
            augmentation, the same on a rerun and after a resume.

    Runs in ``fit`` before every validation (after the `EMA` callback swaps in the averaged
    weights, whose statistics are recomputed too) and at the end of a training epoch that
    ends without validation, so checkpoints carry statistics of their own weights. Under DDP
    each device averages its own share of the batches and the statistics are then averaged
    over devices. The forward passes run without gradients, in the trainer's precision, with
    dropout and stochastic depth off (as evaluation has them) and the global RNGs untouched.
    """

    def __init__(self, enabled: bool = True, num_batches: int = 32) -> None:
        if num_batches < 1:
            raise UserInputError(
                f"precise_bn.num_batches is {num_batches}: give the number of training batches "
                "to recompute BatchNorm statistics on (e.g. 32), or precise_bn.enabled false"
            )
        self.enabled = enabled
        self.num_batches = num_batches
        self.seconds = 0.0  # time spent in the latest recomputation
        self._step_done = -1  # global step whose weights the statistics describe

    # ------------------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.recompute(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._step_done != trainer.global_step:  # no validation since the last step
            self.recompute(trainer, pl_module)

    # --------------------------------------------------------------------------- the work
    def recompute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Recomputes the statistics of the network, and of the EMA copy when there is one."""
        networks = [getattr(pl_module, "model", pl_module)]
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
        if ema is not None and ema.module is not None:
            networks.append(ema.module)  # the other set of weights (raw or averaged)
        norms = [[m for m in net.modules() if isinstance(m, _BatchNorm)] for net in networks]
        if not self.enabled or not any(norms) or trainer.train_dataloader is None:
            return
        started = time.perf_counter()
        loader = self._loader(trainer)
        for network, modules in zip(networks, norms, strict=True):
            if modules:
                _recompute(network, modules, loader, trainer)
                _average_over_devices(modules, trainer)
        self._step_done = trainer.global_step
        self.seconds = time.perf_counter() - started
        rank_zero_info(
            f"precise BN: statistics of {sum(map(len, norms))} BatchNorms recomputed on "
            f"{len(loader)} batches in {self.seconds:.1f} s"
        )

    def _loader(self, trainer: L.Trainer) -> DataLoader:
        """A seeded draw of `num_batches` full batches of this device's share of the train set."""
        train = trainer.train_dataloader
        dataset, batch_size = train.dataset, train.batch_size or 1
        world, rank = trainer.world_size, trainer.global_rank
        batches = min(self.num_batches, len(dataset) // world // batch_size)
        seed, epoch = global_seed(), trainer.current_epoch
        order = torch.randperm(
            len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, epoch, _STREAM))
        )[rank::world][: batches * batch_size].tolist()
        keys: list[Any] = order
        if isinstance(dataset, SeededSamples):  # each sample's augmentation from its own seed
            seeds = derive_seeds(len(order), seed, epoch, rank, _STREAM)
            keys = [(index, int(s)) for index, s in zip(order, seeds, strict=True)]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=keys,
            collate_fn=train.collate_fn,
            num_workers=train.num_workers,
            pin_memory=train.pin_memory,
        )

    # ------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"step_done": self._step_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._step_done = int(state_dict.get("step_done", -1))


@torch.no_grad()
def _recompute(
    network: nn.Module, norms: list[_BatchNorm], loader: DataLoader, trainer: L.Trainer
) -> None:
    modes = {module: module.training for module in network.modules()}
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone()) for bn in norms]
    device = trainer.strategy.root_device
    try:
        network.train()
        for module in network.modules():
            if isinstance(module, _STOCHASTIC):
                module.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(global_seed(), trainer.global_step, _STREAM))
            for batch in loader:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                with trainer.precision_plugin.forward_context():
                    network(images.to(device, non_blocking=True))
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)  # the training count goes on as it was
        for module, training in modes.items():
            module.train(training)


def _average_over_devices(norms: list[_BatchNorm], trainer: L.Trainer) -> None:
    if trainer.world_size < 2:
        return
    stats = [bn.running_mean for bn in norms] + [bn.running_var for bn in norms]
    flat = torch.cat([s.float().flatten() for s in stats])
    flat = trainer.strategy.reduce(flat, reduce_op="mean")
    offset = 0
    for stat in stats:
        stat.copy_(flat[offset : offset + stat.numel()].view_as(stat))
        offset += stat.numel()

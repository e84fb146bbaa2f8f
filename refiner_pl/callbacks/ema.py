"""`EMA`: an exponential moving average of the network's weights, as a Lightning callback.

The average is timm's `ModelEmaV3`, with its decay semantics: the first update copies the
weights, every later one moves the average by ``1 - decay`` towards them (optionally with
timm's decay warmup), parameters and buffers alike. It follows the optimizer steps, so
gradient accumulation is respected.

Why not Lightning's own `WeightAveraging` / `EMAWeightAveraging` (lightning 2.6)? They fit
neither the recipe nor the ``validate`` workflow: their decay is fixed (no timm warmup, no
step-indexed decay), they always evaluate the average, they overwrite the trained weights
with the average when training ends, and they store the average as the checkpoint's
``state_dict`` (the raw weights under a key only that callback knows), so scoring the raw
weights of a checkpoint would need that callback's internals. Here the checkpoint stays a
plain Lightning checkpoint: ``state_dict`` holds the raw weights (resume, fine-tune and
``load_from_checkpoint`` behave as without EMA) and the averaged weights travel in this
callback's state, ``checkpoint["callbacks"]["EMA"]["weights"]``. `validate_ema` picks which
weights the evaluation loops score.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.utils import ModelEmaV3
from torch import nn

from refiner_pl.checkpoint_io import EMA_STATE_KEY as STATE_KEY
from refiner_pl.errors import UserInputError

NETWORK_PREFIX = "model."
"""The averaged network is ``pl_module.model``: its keys in the module's state_dict start so."""


class EMA(L.Callback):
    """Keeps an exponential moving average of ``pl_module.model`` (the timm network).

    Enable it in a config with the ``ema`` section of ``cli.py``::

        ema:
          class_path: refiner_pl.callbacks.EMA
          init_args:
            decay: 0.99996
            validate_ema: true

    or in Python with ``Trainer(callbacks=[EMA(decay=0.99996)])``.

    Args:
        decay: weight of the average at each optimizer step; the average spans roughly
            ``1 / (1 - decay)`` steps (the Refiner-ViT release: 0.99996).
        warmup: ramp the decay up as timm does, ``1 - (1 + step / warmup_gamma) **
            -warmup_power`` capped at ``decay``, so that the early average is not dominated
            by the initial weights; off reproduces the release.
        warmup_gamma: step scale of the warmup ramp.
        warmup_power: exponent of the warmup ramp (2/3 suits a million steps, 3/4 fewer).
        device: device of the averaged weights, e.g. ``cpu`` to save accelerator memory (then
            every update copies the weights off the accelerator, which costs time; under DDP
            each process keeps its own, identical copy); null keeps them next to the model.
        validate_ema: evaluate the averaged weights instead of the raw ones in every
            evaluation loop: the validation during ``fit`` (so ``checkpoint.monitor`` and the
            best checkpoint follow the average, as in timm's train.py), and ``validate``,
            ``test`` and ``predict``, which take the average from the checkpoint's EMA state.
            False evaluates the raw weights; the average is still kept and checkpointed.
    """

    def __init__(
        self,
        decay: float = 0.9998,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: str | None = None,
        validate_ema: bool = True,
    ) -> None:
        if not 0 < decay < 1:
            raise UserInputError(
                f"ema decay is {decay}: use a value in (0, 1), e.g. 0.99996 (closer to 1 "
                "averages over more steps)"
            )
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise UserInputError(
                f"ema warmup_gamma ({warmup_gamma}) and warmup_power ({warmup_power}) must be "
                "> 0, e.g. 1.0 and 2/3 (timm's defaults)"
            )
        try:
            self.device = None if device is None else torch.device(device)
        except RuntimeError:
            raise UserInputError(
                f"ema device {device!r} is not a torch device: use e.g. cpu, cuda or null"
            ) from None
        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.validate_ema = validate_ema
        self._ema: ModelEmaV3 | None = None
        self._loaded: dict[str, Any] | None = None  # checkpoint state, until the EMA exists
        self._num_updates = 0  # trainer.global_step at the latest update
        self._swapped = False  # the network holds the averaged weights right now

    @property
    def state_key(self) -> str:
        return STATE_KEY

    @property
    def module(self) -> nn.Module | None:
        """The averaged network (None until ``fit`` starts or a checkpoint provides it)."""
        return None if self._ema is None else self._ema.module

    @property
    def num_updates(self) -> int:
        """Optimizer steps (``trainer.global_step``) the average had seen at its last update."""
        return self._num_updates

    # ------------------------------------------------------------------------ training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a fresh average; a resumed checkpoint refills it (load_state_dict)
            self._ema, self._loaded, self._num_updates = None, None, 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in setup(): the model is on its device and a resumed run's weights are in.
        if self._ema is None:
            self._build(pl_module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # global_step counts optimizer steps: with accumulate_grad_batches=N it moves (and the
        # average with it) once every N batches. timm's step semantics: step 1 copies.
        step = trainer.global_step
        if step > self._num_updates:
            assert self._ema is not None
            self._ema.update(_network(pl_module), step=step)
            self._num_updates = step

    # ---------------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._swap_out(pl_module)  # never leave the averaged weights in the trained network

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._ema is None:
            return dict(self._loaded or {})  # a checkpoint's average not needed yet: keep it
        return {
            "weights": self._ema.module.state_dict(),
            "num_updates": self._num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("weights"):
            return
        if self._ema is None:  # before fit starts (resume) or in validate/test/predict
            self._loaded = state_dict
        else:
            self._load(state_dict)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._swapped:
            return
        # Saved during an evaluation epoch: the network holds the average and the EMA holder
        # the raw weights. Put each back where it belongs in the checkpoint.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state:
            return
        prefix = NETWORK_PREFIX
        model_state = checkpoint["state_dict"]
        raw = state["weights"]
        state["weights"] = {key: model_state[prefix + key] for key in raw}
        for key, value in raw.items():
            model_state[prefix + key] = value

    # --------------------------------------------------------------------------- helpers
    def _build(self, pl_module: L.LightningModule) -> None:
        network = _network(pl_module)
        model_device = next(network.parameters()).device
        device = self.device
        if device is not None and _same_device(device, model_device):
            device = None  # ModelEmaV3 then keeps its fast foreach update
        self._ema = ModelEmaV3(
            network,
            decay=self.decay,
            use_warmup=self.warmup,
            warmup_gamma=self.warmup_gamma,
            warmup_power=self.warmup_power,
            device=device,
        )
        self._ema.requires_grad_(False)
        if self._loaded is not None:
            self._load(self._loaded)
            self._loaded = None

    def _load(self, state: dict[str, Any]) -> None:
        assert self._ema is not None
        self._ema.module.load_state_dict(state["weights"])
        self._num_updates = int(state.get("num_updates", 0))
        rank_zero_info(f"EMA: restored the averaged weights ({self._num_updates} updates)")

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.validate_ema or self._swapped:
            return
        if self._ema is None:
            if self._loaded is None:
                raise UserInputError(
                    "ema.validate_ema is true but there are no EMA weights to evaluate (the "
                    "checkpoint was trained without EMA, or no --ckpt_path was given): pass a "
                    "checkpoint trained with EMA, or evaluate the raw weights with "
                    "--ema.validate_ema false"
                )
            self._build(pl_module)
        self._swap(pl_module)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        """Exchanges the values of the network's and the average's parameters and buffers."""
        assert self._ema is not None
        averaged = self._ema.module.state_dict()
        for key, value in _network(pl_module).state_dict().items():
            held = averaged[key]
            saved = value.clone()
            value.copy_(held)
            held.copy_(saved)
        self._swapped = not self._swapped


def _network(pl_module: L.LightningModule) -> nn.Module:
    network = getattr(pl_module, "model", None)
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"EMA averages the LightningModule's `model` attribute (the network), which "
            f"{type(pl_module).__name__} does not have; use refiner_pl.module.ImageClassifier"
        )
    return network


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

"""Lightning callbacks of the training recipe."""

from refiner_pl.callbacks.ema import EMA, has_ema_weights, load_ema_weights

__all__ = ["EMA", "has_ema_weights", "load_ema_weights"]

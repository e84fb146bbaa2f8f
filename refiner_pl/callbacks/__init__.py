"""Lightning callbacks of the training recipe and of the CLI's outputs."""

from refiner_pl.callbacks.attention import AttentionMonitor
from refiner_pl.callbacks.confusion import ConfusionMatrixLogger
from refiner_pl.callbacks.cpu_memory import KeepFreedMemory, keep_freed_memory
from refiner_pl.callbacks.ema import EMA
from refiner_pl.callbacks.nonfinite import NonFiniteLoss, NonFiniteLossError
from refiner_pl.callbacks.precise_bn import PreciseBN
from refiner_pl.callbacks.predictions import PredictionWriter
from refiner_pl.callbacks.results import EvaluationResults

__all__ = [
    "AttentionMonitor",
    "ConfusionMatrixLogger",
    "EMA",
    "EvaluationResults",
    "KeepFreedMemory",
    "NonFiniteLoss",
    "NonFiniteLossError",
    "PreciseBN",
    "PredictionWriter",
    "keep_freed_memory",
]

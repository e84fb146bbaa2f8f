"""Keep freed CPU memory in the process for reuse, instead of handing it back to the system.

glibc serves every allocation above 32 MB (and, once freed at the top of the heap, smaller
ones too) with fresh pages from the kernel, and returns them on free. A CPU training step of
Refiner-ViT allocates and frees many such tensors (a 3H-channel map is 45 MB for S at 224 px,
batch 8; the stem's activations are 51 MB), so it spends a good part of its time in page
faults that zero memory it has just given back: a fresh 45 MB tensor costs ~10 ms before the
first write, while writing it costs ~3 ms. Keeping freed memory is what PyTorch's CUDA
caching allocator does for GPU memory, and what preloading jemalloc or tcmalloc does (as
Intel's PyTorch tuning guide recommends). The price: the process keeps its peak footprint
until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator

__all__ = ["KeepFreedMemory", "keep_freed_memory"]

_logger = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
_applied = False


def keep_freed_memory() -> bool:
    """Switch glibc's malloc, for the rest of this process, to serve every allocation from
    its heap and never hand freed memory back. Returns whether it is on; ``False`` (and
    nothing changed) where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc returns 1 on success; stubs elsewhere (musl's) return 0 and change nothing
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    return _applied


class KeepFreedMemory(L.Callback):
    """On a CPU run, calls `keep_freed_memory` before the run starts (a no-op on GPUs,
    whose memory PyTorch already caches).

    Args:
        enabled: ``false`` leaves the C library's allocator as it is.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or not isinstance(trainer.accelerator, CPUAccelerator):
            return
        if keep_freed_memory():
            _logger.info("CPU run: glibc malloc keeps freed memory for reuse (no trimming)")
        else:
            _logger.info("CPU run: the C library is not glibc, so its allocator is unchanged")

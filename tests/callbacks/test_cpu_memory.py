"""KeepFreedMemory: a CPU run reuses freed memory instead of faulting in fresh pages.

The switch is process-wide and cannot be undone, so the check runs in its own interpreter.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource

    import lightning as L

    from refiner_pl.callbacks import cpu_memory
    from refiner_pl.callbacks.cpu_memory import KeepFreedMemory

    SIZE = 64 * 2**20

    def faults_of_a_fresh_buffer():
        # a freed 64 MB buffer, then a new one of the same size, written once
        buffer = bytearray(SIZE)
        del buffer
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = bytearray(SIZE)  # zero-filled, so every page is touched
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    KeepFreedMemory(enabled=False).setup(trainer, None, "fit")
    assert not cpu_memory._applied
    default = faults_of_a_fresh_buffer()
    KeepFreedMemory().setup(trainer, None, "fit")
    assert cpu_memory._applied
    print(default, faults_of_a_fresh_buffer())
    """
)


@pytest.mark.slow  # its own interpreter
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    default, kept = map(int, run.stdout.split()[-2:])
    pages = 64 * 2**20 // 4096
    assert default > pages // 2  # glibc maps a 64 MB buffer afresh: one fault per page
    assert kept < pages // 20

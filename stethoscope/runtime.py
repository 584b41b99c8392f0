"""Process-wide CPU memory setting that PyTorch leaves to the user.

PyTorch allocates CPU tensors with plain ``malloc``. glibc hands every freed block larger
than 128 KiB straight back to the operating system (``munmap``, heap trim), so a training
step or a batch of spectrograms that frees and re-allocates the same large tensors
page-faults them in again every time: measured 1.5-1.8x slower training and up to 4x slower
log-mel extraction on the 2-core benchmark machine (docs/benchmarks.md). Keeping freed
memory in the heap is what jemalloc/tcmalloc do; they need ``LD_PRELOAD``, so this asks
glibc itself through ``mallopt`` (no library exposes it).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; freed memory stays there
OPT_OUT = "STETHOSCOPE_SYSTEM_MALLOC"  # set to 1 to leave malloc as it is
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD")


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks (up to 1 GiB) for reuse; once per process.

    Returns whether the setting is in force. Does nothing off Linux/glibc, when the user
    chose an allocator or malloc settings themselves (``LD_PRELOAD``, ``MALLOC_*_``,
    ``GLIBC_TUNABLES``), or when ``STETHOSCOPE_SYSTEM_MALLOC=1``. The cost: memory freed
    after a large step is kept by the process rather than returned to the system.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: leave it alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))

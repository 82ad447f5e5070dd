"""Keeping freed memory in the process, so training steps do not page-fault.

Every step allocates the same large arrays (activations, their gradients) and
frees them again. glibc returns blocks above its mmap threshold to the OS on
free, so the next step's arrays fault every page in afresh: measured here at
about 14 % of a SmallCNN step (conv1's 16 MiB output alone costs 2 ms). The
training CLI and the training benchmark turn that off for their process.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory (glibc ``mallopt``).

    Process-wide, for the life of the process. Returns False (and changes
    nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))

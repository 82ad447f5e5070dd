"""Thread control for fastkern's parallel kernels.

fastkern kernels run on Numba's thread pool. Its default size is the number of
cores, or ``NUMBA_NUM_THREADS`` when that is set, and it cannot grow past that
at run time. numpy's BLAS keeps its own pool: fastkern never calls it in its
kernels, so the two only compete when user code alternates numpy matmuls with
fastkern ops; set ``OPENBLAS_NUM_THREADS`` (or use threadpoolctl) for that case.
"""
from __future__ import annotations

import contextlib
import numbers

import numba


_query = None


def get_num_threads() -> int:
    """Number of threads fastkern kernels use (Numba's setting for the calling thread)."""
    global _query
    if _query is None:
        numba.get_num_threads()  # starts the pool, which binds the raw query
        from numba.np.ufunc import parallel
        # the raw query skips 1.5 us of Python per call; every op asks once
        _query = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
    return _query()


def max_threads() -> int:
    """Upper bound for :func:`set_num_threads` (cores, or ``NUMBA_NUM_THREADS``)."""
    return numba.config.NUMBA_NUM_THREADS


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (1 <= n <= :func:`max_threads`) in every parallel kernel."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"number of threads must be an int, got {n!r}")
    if not 1 <= n <= max_threads():
        raise ValueError(f"number of threads must be in [1, {max_threads()}], got {n}")
    numba.set_num_threads(int(n))


@contextlib.contextmanager
def threads(n: int):
    """Context manager: run the block with ``n`` threads, then restore the previous count."""
    previous = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)

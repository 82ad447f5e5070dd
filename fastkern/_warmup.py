"""Ahead-of-time compilation of fastkern's kernels."""
from __future__ import annotations

import time

import numpy as np


def warmup(dtypes=("float32",)) -> float:
    """Compile (or load from cache) the kernels for ``dtypes``; return the seconds it took."""
    from . import gemm

    t0 = time.perf_counter()
    for name in dtypes:
        dt = np.dtype(name)
        if dt not in (np.float32, np.float64):
            raise ValueError(f"warmup dtypes must be float32 or float64, got {name!r}")
        gemm._warmup(dt)
        from . import activations, losses, pool
        activations._warmup(dt)
        losses._warmup(dt)
        pool._warmup(dt)
        from . import norm, regularization
        from .linear import _warmup as warmup_linear  # fastkern.linear is the function
        warmup_linear(dt)
        norm._warmup(dt)
        regularization._warmup(dt)
        from . import optim
        optim._warmup(dt)
        from . import conv
        conv._warmup(dt)
    return time.perf_counter() - t0

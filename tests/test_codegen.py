"""How fastkern compiles its parallel kernels (fastkern/_codegen.py)."""
import sys

import numba
import numpy as np
from numba import prange

import fastkern  # noqa: F401  (importing it wraps the package's kernels)
from fastkern._codegen import thin_launch, zeros


def _parallel_kernels():
    for name, module in list(sys.modules.items()):
        if name.startswith("fastkern."):
            for value in vars(module).values():
                if isinstance(value, numba.core.registry.CPUDispatcher) and value.targetoptions.get("parallel"):
                    yield value


def test_every_parallel_kernel_skips_its_launch_wrappers_optimization():
    kernels = list(_parallel_kernels())
    assert len(kernels) > 40
    unwrapped = [k.py_func.__qualname__ for k in kernels if k.compile.__qualname__ != "_compiled_within.<locals>.compile"]
    assert unwrapped == []


def test_thin_launch_kernel_computes_what_numpy_does():
    def row_sums(x, out, n_threads):
        counts = zeros(1, np.int64)
        per = (x.shape[0] + n_threads - 1) // n_threads
        for t in prange(n_threads):
            for i in range(t * per, min(x.shape[0], (t + 1) * per)):
                s = 0.0
                for j in range(x.shape[1]):
                    s += x[i, j]
                out[i] = s
        return counts.size

    kernel = thin_launch(numba.njit(parallel=True)(row_sums))
    x = np.random.default_rng(0).standard_normal((37, 11))
    out = np.zeros(37)
    assert kernel(x, out, 2) == 1
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-12)

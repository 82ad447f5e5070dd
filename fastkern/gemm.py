"""Matrix multiply: ``fastkern.matmul``.

Internal contract used by other kernels (conv, linear):

* ``gemm_into(a, b, out, alpha, beta)``: Python entry, no validation. ``a`` is
  (M, K), ``b`` is (K, N), any strides (transposed views included), same float
  dtype; ``out`` is C-contiguous (M, N). Computes ``out = alpha*a@b + beta*out``
  with all threads.
* ``gemm_serial(a, b, c, alpha, beta)``: a single-threaded ``@njit`` kernel with
  the same meaning, callable from inside other kernels' ``prange`` loops.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import check_no_overlap, check_out, check_scalar

_MATMUL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@njit(cache=True, nogil=True)
def gemm_serial(a, b, c, alpha, beta):
    m, k = a.shape
    n = b.shape[1]
    for i in range(m):
        for j in range(n):
            c[i, j] *= beta
        for p in range(k):
            s = alpha * a[i, p]
            for j in range(n):
                c[i, j] += s * b[p, j]


@njit(cache=True, parallel=True)
def _gemm_parallel(a, b, c, alpha, beta):
    m, k = a.shape
    n = b.shape[1]
    for i in prange(m):
        for j in range(n):
            c[i, j] *= beta
        for p in range(k):
            s = alpha * a[i, p]
            for j in range(n):
                c[i, j] += s * b[p, j]


def gemm_into(a, b, out, alpha=1.0, beta=0.0):
    """``out = alpha * a @ b + beta * out`` with no validation (see module docstring)."""
    dt = out.dtype.type
    if beta == 0.0:
        out.fill(0)  # beta * NaN must not leak into a fresh result
        beta = 1.0
    _gemm_parallel(a, b, out, dt(alpha), dt(beta))
    return out


def _check_matmul_args(a, b, trans_a, trans_b):
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if a.dtype != b.dtype or a.dtype not in _MATMUL_DTYPES:
        raise TypeError(
            f"matmul needs two float32 or two float64 arrays, got a: {a.dtype}, b: {b.dtype}"
        )
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul needs 2-D arrays, got a.shape={a.shape}, b.shape={b.shape}")
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    if opa.shape[1] != opb.shape[0]:
        raise ValueError(
            f"matmul shape mismatch: a.shape={a.shape} (trans_a={trans_a}) and "
            f"b.shape={b.shape} (trans_b={trans_b}) give op(a) {opa.shape} @ op(b) {opb.shape}"
        )
    return opa, opb


def matmul(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None):
    """``alpha * op(a) @ op(b) + beta * out`` for 2-D float32/float64 arrays.

    ``op(x)`` is ``x.T`` when the matching ``trans_*`` flag is set. With
    ``out=None`` a new array is returned and ``beta`` is ignored. Otherwise
    ``out`` must be a C-contiguous array of shape (M, N) and the inputs' dtype,
    not overlapping either input; it is updated in place and returned.

    Raises TypeError for non-float or mixed dtypes and ValueError for
    mismatched shapes, naming the shapes and transposes.
    """
    opa, opb = _check_matmul_args(a, b, trans_a, trans_b)
    alpha = check_scalar(alpha, "alpha")
    beta = check_scalar(beta, "beta")
    m, n = opa.shape[0], opb.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)
        beta = 0.0
    else:
        check_out(out, (m, n), a.dtype)
        check_no_overlap(out, a=a, b=b)
    if m == 0 or n == 0:
        return out
    return gemm_into(opa, opb, out, alpha, beta)

"""Fully connected layer: ``linear`` and ``linear_backward`` (torch.nn.functional.linear semantics).

Both directions are GEMMs on the caller's arrays through ``gemm_into`` with
transposed *views* (never transposed copies):

    forward      y  = x @ W.T + b        out initialized to b, then beta=1
    grad input   gx = gy @ W
    grad weight  gW = gy.T @ x
    grad bias    gb = column sums of gy  (row chunks, combined in a fixed order)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_same_dtype, check_shape, check_vector
from ._codegen import zeros
from .gemm import gemm_into

# Rows of grad_y summed by one prange iteration of the bias gradient. A chunk of
# 64 rows x out_features stays in L2 for the usual layer widths; the number of
# chunks depends only on N, so the result does not depend on the thread count.
_BIAS_ROW_CHUNK = 64
# Below this many elements the bias broadcast and the bias gradient run on one
# thread: waking the pool (3-5 us) cost more than the pass itself on the small
# layers of LeNet5 and the MLPs (64x84 -> 10: forward 16.6 -> 14.0 us, backward
# 24.0 -> 21.7 us; 64x128 -> 10: 27.3 -> 23.9 and 38.0 -> 34.6 us).
_PARALLEL_MIN = 1 << 16


@njit(cache=True, parallel=True)
def _broadcast_rows(bias, out):
    """out[i, :] = bias for every row (the beta=1 initialization of the forward GEMM)."""
    n, m = out.shape
    for i in prange(n):
        for j in range(m):
            out[i, j] = bias[j]


@njit(inline="always")
def _chunk_sum(g, acc, b):
    for i in range(b * _BIAS_ROW_CHUNK, min(g.shape[0], (b + 1) * _BIAS_ROW_CHUNK)):
        for j in range(g.shape[1]):
            acc[j] += g[i, j]


@njit(inline="always")
def _combine_chunks(partial, out):
    for j in range(out.size):
        s = 0.0
        for b in range(partial.shape[0]):
            s += partial[b, j]
        out[j] = s


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract", "nsz"})
def _column_sums(g, out):
    """out[j] = sum_i g[i, j], accumulated in float64."""
    partial = zeros(((g.shape[0] + _BIAS_ROW_CHUNK - 1) // _BIAS_ROW_CHUNK, g.shape[1]), np.float64)
    for b in prange(partial.shape[0]):
        _chunk_sum(g, partial[b], b)
    _combine_chunks(partial, out)


@njit(cache=True, fastmath={"reassoc", "contract", "nsz"})
def _column_sums_serial(g, out):
    """:func:`_column_sums` on one thread, chunk by chunk in the same order (the same result)."""
    partial = np.zeros(((g.shape[0] + _BIAS_ROW_CHUNK - 1) // _BIAS_ROW_CHUNK, g.shape[1]), np.float64)
    for b in range(partial.shape[0]):
        _chunk_sum(g, partial[b], b)
    _combine_chunks(partial, out)


def _gemm(a, b, out, beta):
    """gemm_into that also covers empty dimensions (nothing to multiply: keep beta*out)."""
    if a.shape[1] == 0 or out.size == 0:
        if beta == 0.0:
            out.fill(0)
        return out
    return gemm_into(a, b, out, 1.0, beta)


def _check_linear(x, weight, bias):
    check_array(x, "x", 2)
    check_array(weight, "weight", 2)
    if bias is not None:
        check_vector(bias, "bias", weight.shape[0], f"out_features of weight {weight.shape}")
    check_same_dtype(x=x, weight=weight, bias=bias)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear: x.shape={x.shape} has {x.shape[1]} in_features but weight.shape="
            f"{weight.shape} expects {weight.shape[1]} (weight is (out_features, in_features))"
        )


def linear(x, weight, bias=None):
    """``y = x @ weight.T + bias``, as ``torch.nn.functional.linear``.

    Args:
        x: (N, in_features) float32/float64.
        weight: (out_features, in_features), same dtype.
        bias: optional (out_features,), same dtype.

    Returns:
        A new C-contiguous (N, out_features) array.

    Raises:
        TypeError: non-float or mixed dtypes.
        ValueError: wrong ndim, in_features mismatch (naming both shapes), wrong bias length.
    """
    _check_linear(x, weight, bias)
    y = np.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
    if bias is None:
        return _gemm(x, weight.T, y, 0.0)
    if y.size >= _PARALLEL_MIN:
        _broadcast_rows(np.ascontiguousarray(bias), y)
    else:
        y[...] = bias
    return _gemm(x, weight.T, y, 1.0)


def linear_backward(grad_y, x, weight, bias_grad=True):
    """Gradients of :func:`linear`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` is (N, out_features). ``grad_bias`` is None when ``bias_grad``
    is False (a layer without bias). All results are new C-contiguous arrays.
    """
    check_array(grad_y, "grad_y", 2)
    _check_linear(x, weight, None)
    check_same_dtype(grad_y=grad_y, x=x, weight=weight)
    check_shape(grad_y, (x.shape[0], weight.shape[0]), "grad_y",
                f"(N, out_features) from x {x.shape} and weight {weight.shape}")
    dt = x.dtype
    grad_x = _gemm(grad_y, weight, np.empty(x.shape, dt), 0.0)
    grad_weight = _gemm(grad_y.T, x, np.empty(weight.shape, dt), 0.0)
    grad_bias = None
    if bias_grad:
        grad_bias = np.empty(weight.shape[0], dt)
        if grad_y.shape[0] == 0:
            grad_bias.fill(0)
        elif grad_bias.size:
            gy = np.ascontiguousarray(grad_y)
            (_column_sums if gy.size >= _PARALLEL_MIN else _column_sums_serial)(gy, grad_bias)
    return grad_x, grad_weight, grad_bias


def _warmup(dt):
    """Compile every kernel linear and linear_backward reach for dtype ``dt``."""
    for n, m in ((2, 4), (_PARALLEL_MIN // 64, 64)):  # the serial and the parallel bias kernels
        x, w, b = np.ones((n, 3), dt), np.ones((m, 3), dt), np.ones(m, dt)
        linear(x, w, b)
        linear_backward(linear(x, w), x, w)

"""Activations: ReLU, leaky ReLU, sigmoid, tanh, softmax, log-softmax and fused bias + ReLU.

Every forward sits beside its backward. Backward takes the tensor torch's
autograd saves: the input ``x`` for ReLU and leaky ReLU (the two agree on the
mask), the output ``y`` for sigmoid, tanh, softmax, log-softmax and bias + ReLU.

Elementwise ops work on the flat array: arrays below ``PARALLEL_MIN`` elements
run on one thread (a parallel launch costs a few microseconds, more than the
whole op), larger ones are split into ``CHUNK``-element spans over ``prange``.

``out=`` writes the result into a preallocated C-contiguous array, which
avoids a fresh allocation (and its page faults) per call in a training loop.
For the elementwise forward and backward ops ``out`` may be one of the
inputs itself (``relu(x, out=x)`` is an in-place ReLU): each element is read
before it is written at the same index. Partial overlaps are rejected.
"""
from __future__ import annotations

import numbers

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_out, check_same_dtype, check_scalar

# A span of 16K elements is 64 KiB of float32 per operand: two operands fit
# in L2 with room to spare, and the per-span loop is long enough to amortize
# its setup. Below 64K elements one core finishes before a parallel launch
# would pay off; transcendental ops cost ~10x more per element, so they go
# parallel sooner.
CHUNK = 1 << 14
PARALLEL_MIN = 1 << 16
PARALLEL_MIN_TRANSCENDENTAL = 1 << 13


# ---------------------------------------------------------------- validation


def _elementwise_out(out, shape, dtype, **inputs):
    """A fresh output, or ``out`` checked: exact shape/dtype, and either one of the inputs or disjoint."""
    if out is None:
        return np.empty(shape, dtype)
    check_out(out, shape, dtype)
    for k, v in inputs.items():
        if v is not out and np.may_share_memory(out, v) and not (
            out.__array_interface__["data"][0] == v.__array_interface__["data"][0]
            and out.strides == v.strides
        ):
            raise ValueError(f"out partially overlaps input {k}; pass {k} itself or a separate array")
    return out


def _contig(x):
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _check_pair(a, b, name_a, name_b):
    check_array(a, name_a)
    check_array(b, name_b)
    check_same_dtype(**{name_a: a, name_b: b})
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match")


def _check_axis(axis, ndim, name="axis"):
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a {ndim}-D array")
    return int(axis) % ndim


def _run(span, par, threshold, *arrays):
    """Call the serial span kernel on small arrays and the chunked parallel one on large ones."""
    flat = [a.reshape(-1) for a in arrays]
    n = flat[0].size
    if n < threshold:
        span(*flat, 0, n)
    else:
        par(*flat)


# ---------------------------------------------------------------- ReLU
# Span kernels take (lo, hi) but loop over slices: with ``range(lo, hi)``
# numba cannot prove the index non-negative and keeps its wraparound check,
# which makes the loop ~10x slower; ``range(slice.size)`` vectorizes.


@njit(cache=True, nogil=True)
def _relu_span(x, y, lo, hi):
    x = x[lo:hi]
    y = y[lo:hi]
    for i in range(x.size):
        v = x[i]
        y[i] = 0 if v < 0 else v  # NaN passes through, as in torch


@njit(cache=True, parallel=True)
def _relu_par(x, y):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _relu_span(x, y, k * CHUNK, min(n, (k + 1) * CHUNK))


def relu(x, out=None):
    """``max(x, 0)`` elementwise. ``out`` may be ``x`` itself for an in-place ReLU."""
    check_array(x, "x")
    out = _elementwise_out(out, x.shape, x.dtype, x=x)
    _run(_relu_span, _relu_par, PARALLEL_MIN, _contig(x), out)
    return out


@njit(cache=True, nogil=True)
def _relu_backward_span(g, x, gx, lo, hi):
    g = g[lo:hi]
    x = x[lo:hi]
    gx = gx[lo:hi]
    for i in range(g.size):
        gx[i] = g[i] if x[i] > 0 else 0


@njit(cache=True, parallel=True)
def _relu_backward_par(g, x, gx):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _relu_backward_span(g, x, gx, k * CHUNK, min(n, (k + 1) * CHUNK))


def relu_backward(grad_y, x, out=None):
    """Gradient of ReLU: ``grad_y`` where ``x > 0``, else 0. ``out`` may be ``grad_y`` itself."""
    _check_pair(grad_y, x, "grad_y", "x")
    out = _elementwise_out(out, x.shape, x.dtype, grad_y=grad_y, x=x)
    _run(_relu_backward_span, _relu_backward_par, PARALLEL_MIN, _contig(grad_y), _contig(x), out)
    return out


# ---------------------------------------------------------------- leaky ReLU


@njit(cache=True, nogil=True)
def _leaky_relu_span(x, slope, y, lo, hi):
    x = x[lo:hi]
    y = y[lo:hi]
    for i in range(x.size):
        v = x[i]
        y[i] = v if v > 0 else v * slope


@njit(cache=True, parallel=True)
def _leaky_relu_par(x, slope, y):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _leaky_relu_span(x, slope, y, k * CHUNK, min(n, (k + 1) * CHUNK))


def leaky_relu(x, negative_slope=0.01, out=None):
    """``x`` where ``x > 0``, else ``negative_slope * x``. ``out`` may be ``x`` itself."""
    check_array(x, "x")
    slope = x.dtype.type(check_scalar(negative_slope, "negative_slope"))
    out = _elementwise_out(out, x.shape, x.dtype, x=x)
    xc = _contig(x).reshape(-1)
    if xc.size < PARALLEL_MIN:
        _leaky_relu_span(xc, slope, out.reshape(-1), 0, xc.size)
    else:
        _leaky_relu_par(xc, slope, out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _leaky_relu_backward_span(g, x, slope, gx, lo, hi):
    g = g[lo:hi]
    x = x[lo:hi]
    gx = gx[lo:hi]
    for i in range(g.size):
        gx[i] = g[i] if x[i] > 0 else g[i] * slope


@njit(cache=True, parallel=True)
def _leaky_relu_backward_par(g, x, slope, gx):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _leaky_relu_backward_span(g, x, slope, gx, k * CHUNK, min(n, (k + 1) * CHUNK))


def leaky_relu_backward(grad_y, x, negative_slope=0.01, out=None):
    """Gradient of leaky ReLU w.r.t. its input ``x``. ``out`` may be ``grad_y`` itself."""
    _check_pair(grad_y, x, "grad_y", "x")
    slope = x.dtype.type(check_scalar(negative_slope, "negative_slope"))
    out = _elementwise_out(out, x.shape, x.dtype, grad_y=grad_y, x=x)
    g, xc, o = _contig(grad_y).reshape(-1), _contig(x).reshape(-1), out.reshape(-1)
    if xc.size < PARALLEL_MIN:
        _leaky_relu_backward_span(g, xc, slope, o, 0, xc.size)
    else:
        _leaky_relu_backward_par(g, xc, slope, o)
    return out


# ---------------------------------------------------------------- sigmoid


@njit(cache=True, nogil=True)
def _sigmoid_span(x, y, lo, hi):
    # exp(-|x|) never overflows: 1/(1+e) for x >= 0 and e/(1+e) for x < 0.
    x = x[lo:hi]
    y = y[lo:hi]
    for i in range(x.size):
        v = x[i]
        e = np.exp(-abs(v))
        s = 1 / (1 + e)
        y[i] = s if v >= 0 else e * s


@njit(cache=True, parallel=True)
def _sigmoid_par(x, y):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _sigmoid_span(x, y, k * CHUNK, min(n, (k + 1) * CHUNK))


def sigmoid(x, out=None):
    """``1 / (1 + exp(-x))``, stable for any finite ``x``. ``out`` may be ``x`` itself."""
    check_array(x, "x")
    out = _elementwise_out(out, x.shape, x.dtype, x=x)
    _run(_sigmoid_span, _sigmoid_par, PARALLEL_MIN_TRANSCENDENTAL, _contig(x), out)
    return out


@njit(cache=True, nogil=True)
def _sigmoid_backward_span(g, y, gx, lo, hi):
    g = g[lo:hi]
    y = y[lo:hi]
    gx = gx[lo:hi]
    for i in range(g.size):
        s = y[i]
        gx[i] = g[i] * s * (1 - s)


@njit(cache=True, parallel=True)
def _sigmoid_backward_par(g, y, gx):
    n = y.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _sigmoid_backward_span(g, y, gx, k * CHUNK, min(n, (k + 1) * CHUNK))


def sigmoid_backward(grad_y, y, out=None):
    """Gradient of sigmoid from its output ``y``: ``grad_y * y * (1 - y)``."""
    _check_pair(grad_y, y, "grad_y", "y")
    out = _elementwise_out(out, y.shape, y.dtype, grad_y=grad_y, y=y)
    _run(_sigmoid_backward_span, _sigmoid_backward_par, PARALLEL_MIN, _contig(grad_y), _contig(y), out)
    return out


# ---------------------------------------------------------------- tanh


@njit(cache=True, nogil=True)
def _tanh_span(x, y, lo, hi):
    x = x[lo:hi]
    y = y[lo:hi]
    for i in range(x.size):
        y[i] = np.tanh(x[i])


@njit(cache=True, parallel=True)
def _tanh_par(x, y):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _tanh_span(x, y, k * CHUNK, min(n, (k + 1) * CHUNK))


def tanh(x, out=None):
    """Hyperbolic tangent elementwise. ``out`` may be ``x`` itself."""
    check_array(x, "x")
    out = _elementwise_out(out, x.shape, x.dtype, x=x)
    _run(_tanh_span, _tanh_par, PARALLEL_MIN_TRANSCENDENTAL, _contig(x), out)
    return out


@njit(cache=True, nogil=True)
def _tanh_backward_span(g, y, gx, lo, hi):
    g = g[lo:hi]
    y = y[lo:hi]
    gx = gx[lo:hi]
    for i in range(g.size):
        t = y[i]
        gx[i] = g[i] * (1 - t * t)


@njit(cache=True, parallel=True)
def _tanh_backward_par(g, y, gx):
    n = y.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        _tanh_backward_span(g, y, gx, k * CHUNK, min(n, (k + 1) * CHUNK))


def tanh_backward(grad_y, y, out=None):
    """Gradient of tanh from its output ``y``: ``grad_y * (1 - y**2)``."""
    _check_pair(grad_y, y, "grad_y", "y")
    out = _elementwise_out(out, y.shape, y.dtype, grad_y=grad_y, y=y)
    _run(_tanh_backward_span, _tanh_backward_par, PARALLEL_MIN, _contig(grad_y), _contig(y), out)
    return out


# ---------------------------------------------------------------- fused bias + ReLU


@njit(cache=True, nogil=True)
def _bias_relu_rows(x, b, y, lo, hi):
    """Rows ``lo:hi`` of (R, C) ``x``: ``y = relu(x + b)`` with ``b`` along the row."""
    c = x.shape[1]
    for r in range(lo, hi):
        for j in range(c):
            v = x[r, j] + b[j]
            y[r, j] = 0 if v < 0 else v


@njit(cache=True, parallel=True)
def _bias_relu_rows_par(x, b, y):
    r = x.shape[0]
    rows = max(1, CHUNK // max(1, x.shape[1]))
    for k in prange((r + rows - 1) // rows):
        _bias_relu_rows(x, b, y, k * rows, min(r, (k + 1) * rows))


@njit(cache=True, nogil=True)
def _bias_relu_planes(x, b, y, lo, hi):
    """Planes ``lo:hi`` of (N*C, S) ``x``: plane ``p`` gets bias ``b[p % C]``."""
    c = b.size
    s = x.shape[1]
    for p in range(lo, hi):
        bp = b[p % c]
        for i in range(s):
            v = x[p, i] + bp
            y[p, i] = 0 if v < 0 else v


@njit(cache=True, parallel=True)
def _bias_relu_planes_par(x, b, y):
    p = x.shape[0]
    per = max(1, CHUNK // max(1, x.shape[1]))
    for k in prange((p + per - 1) // per):
        _bias_relu_planes(x, b, y, k * per, min(p, (k + 1) * per))


def _check_bias_input(x, bias):
    check_array(x, "x")
    check_array(bias, "bias", 1)
    check_same_dtype(x=x, bias=bias)
    if x.ndim < 2:
        raise ValueError(f"x must be (N, C) or (N, C, ...), got {x.ndim}-D array of shape {x.shape}")
    if bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias has shape {bias.shape} but x has {x.shape[1]} channels (x.shape={x.shape})")


def bias_relu(x, bias, out=None):
    """Fused ``relu(x + bias)`` with ``bias`` (C,) broadcast over axis 1 of (N, C) or (N, C, ...) ``x``.

    One pass over memory instead of two. ``out`` may be ``x`` itself.
    """
    _check_bias_input(x, bias)
    out = _elementwise_out(out, x.shape, x.dtype, x=x)
    xc = _contig(x)
    b = _contig(bias)
    if x.ndim == 2:
        x2, y2 = xc, out
        span, par = _bias_relu_rows, _bias_relu_rows_par
    else:
        n, c = x.shape[:2]
        x2, y2 = xc.reshape(n * c, -1), out.reshape(n * c, -1)
        span, par = _bias_relu_planes, _bias_relu_planes_par
    if x.size < PARALLEL_MIN:
        span(x2, b, y2, 0, x2.shape[0])
    else:
        par(x2, b, y2)
    return out


# reassoc lets LLVM vectorize the bias-gradient sums (a strict left-to-right
# float sum cannot be split into lanes); NaN/inf semantics are untouched.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _bias_relu_backward_rows(g, y, gx, part, lo, hi):
    """Rows ``lo:hi`` of (R, C): masked gradient into ``gx``, its column sums into ``part``."""
    c = y.shape[1]
    for j in range(c):
        part[j] = 0
    for r in range(lo, hi):
        for j in range(c):
            v = g[r, j] if y[r, j] > 0 else 0
            gx[r, j] = v
            part[j] += v


@njit(cache=True, parallel=True)
def _bias_relu_backward_rows_par(g, y, gx, parts):
    r = y.shape[0]
    nblk = parts.shape[0]
    rows = (r + nblk - 1) // nblk
    for k in prange(nblk):
        _bias_relu_backward_rows(g, y, gx, parts[k], min(r, k * rows), min(r, (k + 1) * rows))


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _bias_relu_backward_planes(g, y, gx, sums, lo, hi):
    """Planes ``lo:hi`` of (N*C, S): masked gradient into ``gx``, each plane's sum into ``sums``."""
    s = y.shape[1]
    for p in range(lo, hi):
        acc = 0.0  # float64: a plane of float32 terms sums without drift
        for i in range(s):
            v = g[p, i] if y[p, i] > 0 else 0
            gx[p, i] = v
            acc += v
        sums[p] = acc


@njit(cache=True, parallel=True)
def _bias_relu_backward_planes_par(g, y, gx, sums):
    p = y.shape[0]
    per = max(1, CHUNK // max(1, y.shape[1]))
    for k in prange((p + per - 1) // per):
        _bias_relu_backward_planes(g, y, gx, sums, k * per, min(p, (k + 1) * per))


def bias_relu_backward(grad_y, y, out=None):
    """Gradients of :func:`bias_relu` from its output ``y``: ``(grad_x, grad_bias)``.

    ``grad_x = grad_y * (y > 0)`` and ``grad_bias`` sums ``grad_x`` over every
    axis but 1. ``out`` (for ``grad_x``) may be ``grad_y`` itself.
    """
    _check_pair(grad_y, y, "grad_y", "y")
    if y.ndim < 2:
        raise ValueError(f"y must be (N, C) or (N, C, ...), got {y.ndim}-D array of shape {y.shape}")
    out = _elementwise_out(out, y.shape, y.dtype, grad_y=grad_y, y=y)
    g, yc = _contig(grad_y), _contig(y)
    n, c = y.shape[:2]
    big = y.size >= PARALLEL_MIN
    if y.ndim == 2:
        # Row blocks each own a partial column sum: no two iterations write one element.
        nblk = 2 * max(1, min(64, n * c // CHUNK)) if big else 1
        parts = np.empty((nblk, c), y.dtype)
        if big:
            _bias_relu_backward_rows_par(g, yc, out, parts)
        else:
            _bias_relu_backward_rows(g, yc, out, parts[0], 0, n)
        grad_bias = parts.sum(axis=0) if nblk > 1 else parts[0]
    else:
        g2, y2, o2 = g.reshape(n * c, -1), yc.reshape(n * c, -1), out.reshape(n * c, -1)
        sums = np.empty(n * c, y.dtype)
        if big:
            _bias_relu_backward_planes_par(g2, y2, o2, sums)
        else:
            _bias_relu_backward_planes(g2, y2, o2, sums, 0, n * c)
        grad_bias = sums.reshape(n, c).sum(axis=0)
    return out, grad_bias


# ---------------------------------------------------------------- softmax / log-softmax
# Both reduce along one axis. The input is viewed as (outer, K, inner) with K
# the reduced axis: inner == 1 (the last axis) is a row kernel; otherwise each
# outer slab is processed as K vectors of length ``inner``, so the reduction
# runs across vectors and the inner loop stays unit-stride.


@njit(cache=True, nogil=True)
def _softmax_row(x, y, log):
    k = x.size
    m = x[0]
    for j in range(1, k):
        if x[j] > m:
            m = x[j]
    s = 0.0
    for j in range(k):
        s += np.exp(x[j] - m)
    if log:
        lse = m + np.log(s)
        for j in range(k):
            y[j] = x[j] - lse
    else:
        r = 1.0 / s
        for j in range(k):
            y[j] = np.exp(x[j] - m) * r


@njit(cache=True, nogil=True)
def _softmax_slab(x, y, log):
    """One (K, inner) slab: softmax along axis 0."""
    k, inner = x.shape
    m = x[0].copy()
    for j in range(1, k):
        for i in range(inner):
            if x[j, i] > m[i]:
                m[i] = x[j, i]
    s = np.zeros(inner)
    for j in range(k):
        for i in range(inner):
            s[i] += np.exp(x[j, i] - m[i])
    if log:
        for i in range(inner):
            m[i] += np.log(s[i])
        for j in range(k):
            for i in range(inner):
                y[j, i] = x[j, i] - m[i]
    else:
        for j in range(k):
            for i in range(inner):
                y[j, i] = np.exp(x[j, i] - m[i]) / s[i]


@njit(cache=True, parallel=True)
def _softmax_rows_par(x, y, log):
    for o in prange(x.shape[0]):
        _softmax_row(x[o], y[o], log)


@njit(cache=True, nogil=True)
def _softmax_rows(x, y, log):
    for o in range(x.shape[0]):
        _softmax_row(x[o], y[o], log)


@njit(cache=True, parallel=True)
def _softmax_slabs_par(x, y, log):
    for o in prange(x.shape[0]):
        _softmax_slab(x[o], y[o], log)


@njit(cache=True, nogil=True)
def _softmax_slabs(x, y, log):
    for o in range(x.shape[0]):
        _softmax_slab(x[o], y[o], log)


@njit(cache=True, nogil=True)
def _softmax_backward_slab(g, y, gx, log):
    """One (K, inner) slab. softmax: y*(g - sum(g*y)); log-softmax: g - exp(y)*sum(g)."""
    k, inner = y.shape
    s = np.zeros(inner)
    for j in range(k):
        for i in range(inner):
            s[i] += g[j, i] if log else g[j, i] * y[j, i]
    for j in range(k):
        for i in range(inner):
            if log:
                gx[j, i] = g[j, i] - np.exp(y[j, i]) * s[i]
            else:
                gx[j, i] = y[j, i] * (g[j, i] - s[i])


@njit(cache=True, parallel=True)
def _softmax_backward_par(g, y, gx, log):
    for o in prange(y.shape[0]):
        _softmax_backward_slab(g[o], y[o], gx[o], log)


@njit(cache=True, nogil=True)
def _softmax_backward_serial(g, y, gx, log):
    for o in range(y.shape[0]):
        _softmax_backward_slab(g[o], y[o], gx[o], log)


def _as_3d(x, axis):
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    return x.reshape(outer, x.shape[axis], inner)


def _softmax_forward(x, axis, log):
    check_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    ax = _check_axis(axis, x.ndim)
    y = np.empty(x.shape, x.dtype)
    if x.size == 0:
        return y
    x3, y3 = _as_3d(_contig(x), ax), _as_3d(y, ax)
    serial = x.size < PARALLEL_MIN_TRANSCENDENTAL or x3.shape[0] == 1
    if x3.shape[2] == 1:
        x2, y2 = x3.reshape(x3.shape[:2]), y3.reshape(y3.shape[:2])
        (_softmax_rows if serial else _softmax_rows_par)(x2, y2, log)
    else:
        (_softmax_slabs if serial else _softmax_slabs_par)(x3, y3, log)
    return y


def _softmax_backward(grad_y, y, axis, log):
    _check_pair(grad_y, y, "grad_y", "y")
    if y.ndim == 0:
        raise ValueError("y must have at least one dimension")
    ax = _check_axis(axis, y.ndim)
    gx = np.empty(y.shape, y.dtype)
    if y.size == 0:
        return gx
    g3, y3, o3 = _as_3d(_contig(grad_y), ax), _as_3d(_contig(y), ax), _as_3d(gx, ax)
    if y.size < PARALLEL_MIN or y3.shape[0] == 1:
        _softmax_backward_serial(g3, y3, o3, log)
    else:
        _softmax_backward_par(g3, y3, o3, log)
    return gx


def softmax(x, axis=-1):
    """``exp(x) / sum(exp(x))`` along ``axis``, with the max subtracted first (no overflow)."""
    return _softmax_forward(x, axis, False)


def softmax_backward(grad_y, y, axis=-1):
    """Gradient of softmax from its output ``y``: ``y * (grad_y - sum(grad_y * y, axis))``."""
    return _softmax_backward(grad_y, y, axis, False)


def log_softmax(x, axis=-1):
    """``x - logsumexp(x)`` along ``axis``; finite for any finite ``x``."""
    return _softmax_forward(x, axis, True)


def log_softmax_backward(grad_y, y, axis=-1):
    """Gradient of log-softmax from its output ``y``: ``grad_y - exp(y) * sum(grad_y, axis)``."""
    return _softmax_backward(grad_y, y, axis, True)


def _warmup(dt):
    """Compile every kernel above (serial and parallel variants) for dtype ``dt``."""
    x = np.ones(4, dt)
    y = np.empty_like(x)
    slope = dt.type(0.1)
    for span, par, args in (
        (_relu_span, _relu_par, (x, y)),
        (_relu_backward_span, _relu_backward_par, (x, x, y)),
        (_leaky_relu_span, _leaky_relu_par, (x, slope, y)),
        (_leaky_relu_backward_span, _leaky_relu_backward_par, (x, x, slope, y)),
        (_sigmoid_span, _sigmoid_par, (x, y)),
        (_sigmoid_backward_span, _sigmoid_backward_par, (x, x, y)),
        (_tanh_span, _tanh_par, (x, y)),
        (_tanh_backward_span, _tanh_backward_par, (x, x, y)),
    ):
        span(*args, 0, 4)
        par(*args)
    x2, y2, b = np.ones((2, 2), dt), np.empty((2, 2), dt), np.ones(2, dt)
    _bias_relu_rows(x2, b, y2, 0, 2)
    _bias_relu_rows_par(x2, b, y2)
    _bias_relu_planes(x2, b, y2, 0, 2)
    _bias_relu_planes_par(x2, b, y2)
    parts, sums = np.empty((1, 2), dt), np.empty(2, dt)
    _bias_relu_backward_rows(x2, x2, y2, parts[0], 0, 2)
    _bias_relu_backward_rows_par(x2, x2, y2, parts)
    _bias_relu_backward_planes(x2, x2, y2, sums, 0, 2)
    _bias_relu_backward_planes_par(x2, x2, y2, sums)
    x3, y3 = np.ones((2, 2, 2), dt), np.empty((2, 2, 2), dt)
    for kernel, args in ((_softmax_rows, (x2, y2)), (_softmax_rows_par, (x2, y2)), (_softmax_slabs, (x3, y3)),
                         (_softmax_slabs_par, (x3, y3)), (_softmax_backward_serial, (x3, x3, y3)),
                         (_softmax_backward_par, (x3, x3, y3))):
        kernel(*args, True)

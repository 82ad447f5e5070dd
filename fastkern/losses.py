"""Losses, each fused with its gradient: one pass returns ``(loss, grad_input)``.

``reduction`` follows torch: ``'mean'`` (default) and ``'sum'`` return the
loss as a Python float and the gradient of that scalar; ``'none'`` returns the
per-sample (or per-element) losses as an array and the gradient of their sum,
i.e. the gradient each sample would get with an upstream gradient of 1.
A ``'mean'`` over zero elements is NaN, as in torch.

Losses are accumulated in float64 whatever the input dtype, so a float32
batch does not lose the small per-sample terms of a large sum.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_labels, check_same_dtype

# Spans of 16K elements (64 KiB of float32 per operand) per prange iteration;
# each span owns one float64 partial sum, so the reduction needs no atomics.
# Below PARALLEL_MIN elements one core beats the cost of a parallel launch.
CHUNK = 1 << 14
PARALLEL_MIN = 1 << 15

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _scale(reduction, count):
    return 1.0 / count if reduction == "mean" and count > 0 else 1.0


def _reduce(per, reduction, count, dtype):
    """The loss to return from per-sample/per-span float64 partial losses."""
    if reduction == "none":
        return per.astype(dtype, copy=False)
    total = float(per.sum())
    if reduction == "mean":
        return total / count if count else float("nan")
    return total


def _contig(x):
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


# ---------------------------------------------------------------- softmax cross-entropy


@njit(cache=True, nogil=True)
def _softmax_ce_rows(x, labels, scale, grad, losses, lo, hi):
    """Rows ``lo:hi``: loss = logsumexp(x) - x[label]; grad = scale * (softmax(x) - onehot)."""
    c = x.shape[1]
    for r in range(lo, hi):
        row, g = x[r], grad[r]
        m = row[0]
        for j in range(1, c):
            if row[j] > m:
                m = row[j]
        s = 0.0
        for j in range(c):
            e = np.exp(row[j] - m)  # <= 1: no overflow for any finite logit
            g[j] = e
            s += e
        k = labels[r]
        losses[r] = np.log(s) + (m - row[k])
        f = scale / s
        for j in range(c):
            g[j] *= f
        g[k] -= scale


@njit(cache=True, parallel=True)
def _softmax_ce_par(x, labels, scale, grad, losses):
    n, c = x.shape
    rows = max(1, CHUNK // max(1, c))
    for k in prange((n + rows - 1) // rows):
        _softmax_ce_rows(x, labels, scale, grad, losses, k * rows, min(n, (k + 1) * rows))


def softmax_cross_entropy(logits, labels, reduction="mean"):
    """Fused softmax + cross-entropy of (N, C) ``logits`` against integer ``labels`` (N,).

    Returns ``(loss, grad_logits)``. Matches
    ``torch.nn.functional.cross_entropy(logits, labels, reduction=...)`` and its
    gradient; stable for any finite logits (log-sum-exp with the row max
    subtracted).
    """
    check_array(logits, "logits", 2)
    reduction = _check_reduction(reduction)
    n, c = logits.shape
    labels = check_labels(labels, n, c)
    x = _contig(logits)
    grad = np.empty(x.shape, x.dtype)
    losses = np.empty(n, np.float64)
    scale = x.dtype.type(_scale(reduction, n))
    if n * c < PARALLEL_MIN:
        _softmax_ce_rows(x, labels, scale, grad, losses, 0, n)
    else:
        _softmax_ce_par(x, labels, scale, grad, losses)
    return _reduce(losses, reduction, n, x.dtype), grad


# ---------------------------------------------------------------- negative log-likelihood


@njit(cache=True, nogil=True)
def _nll_rows(lp, labels, scale, grad, losses):
    for r in range(lp.shape[0]):
        k = labels[r]
        losses[r] = -lp[r, k]
        grad[r, k] = -scale


def nll_loss(log_probs, labels, reduction="mean"):
    """Negative log-likelihood of (N, C) ``log_probs`` at integer ``labels`` (N,).

    Returns ``(loss, grad_log_probs)``, as ``torch.nn.functional.nll_loss``.
    Pair with :func:`fastkern.log_softmax` (or use :func:`softmax_cross_entropy`).
    """
    check_array(log_probs, "log_probs", 2)
    reduction = _check_reduction(reduction)
    n, c = log_probs.shape
    labels = check_labels(labels, n, c)
    grad = np.zeros(log_probs.shape, log_probs.dtype)
    losses = np.empty(n, np.float64)
    scale = log_probs.dtype.type(_scale(reduction, n))
    _nll_rows(log_probs, labels, scale, grad, losses)
    return _reduce(losses, reduction, n, log_probs.dtype), grad


# ---------------------------------------------------------------- elementwise losses


# Spans slice their arrays and loop over range(size): a provably non-negative
# index lets LLVM drop numba's wraparound check and vectorize.
@njit(cache=True, nogil=True)
def _mse_span(x, t, scale2, grad, lo, hi):
    s = 0.0
    x = x[lo:hi]
    t = t[lo:hi]
    grad = grad[lo:hi]
    for i in range(x.size):
        d = x[i] - t[i]
        grad[i] = scale2 * d
        s += d * d
    return s


@njit(cache=True, nogil=True)
def _mse_none(x, t, grad, per):
    for i in range(x.size):
        d = x[i] - t[i]
        grad[i] = 2 * d
        per[i] = d * d


@njit(cache=True, parallel=True)
def _mse_par(x, t, scale2, grad, partial):
    n = x.size
    for k in prange(partial.size):
        partial[k] = _mse_span(x, t, scale2, grad, k * CHUNK, min(n, (k + 1) * CHUNK))


@njit(cache=True, nogil=True)
def _bce_term(x, t):
    """Loss and d/dx of one element, stable for any finite x: max(x,0) - x*t + log1p(exp(-|x|))."""
    e = np.exp(-abs(x))
    s = 1 / (1 + e)
    sig = s if x >= 0 else e * s
    return max(x, 0) - x * t + np.log1p(e), sig - t


@njit(cache=True, nogil=True)
def _bce_span(x, t, scale, grad, lo, hi):
    s = 0.0
    x = x[lo:hi]
    t = t[lo:hi]
    grad = grad[lo:hi]
    for i in range(x.size):
        loss, d = _bce_term(x[i], t[i])
        grad[i] = scale * d
        s += loss
    return s


@njit(cache=True, nogil=True)
def _bce_none(x, t, grad, per):
    for i in range(x.size):
        loss, d = _bce_term(x[i], t[i])
        grad[i] = d
        per[i] = loss


@njit(cache=True, parallel=True)
def _bce_par(x, t, scale, grad, partial):
    n = x.size
    for k in prange(partial.size):
        partial[k] = _bce_span(x, t, scale, grad, k * CHUNK, min(n, (k + 1) * CHUNK))


def _check_input_target(x, t, xname, tname):
    check_array(x, xname)
    check_array(t, tname)
    check_same_dtype(**{xname: x, tname: t})
    if x.shape != t.shape:
        raise ValueError(f"{tname} has shape {t.shape} but {xname} has shape {x.shape}; they must match")


def _elementwise_loss(x, t, reduction, none_kernel, span, par, grad_factor):
    x, t = _contig(x), _contig(t)
    grad = np.empty(x.shape, x.dtype)
    xf, tf, gf = x.reshape(-1), t.reshape(-1), grad.reshape(-1)
    n = xf.size
    if reduction == "none":
        per = np.empty(n, np.float64)
        none_kernel(xf, tf, gf, per)
        return per.astype(x.dtype).reshape(x.shape), grad
    scale = x.dtype.type(grad_factor * _scale(reduction, n))
    if n < PARALLEL_MIN:
        partial = np.array([span(xf, tf, scale, gf, 0, n)])
    else:
        partial = np.empty((n + CHUNK - 1) // CHUNK, np.float64)
        par(xf, tf, scale, gf, partial)
    return _reduce(partial, reduction, n, x.dtype), grad


def mse_loss(input, target, reduction="mean"):
    """Mean squared error ``(input - target)**2`` and its gradient w.r.t. ``input``.

    Returns ``(loss, grad_input)``, as ``torch.nn.functional.mse_loss``.
    """
    _check_input_target(input, target, "input", "target")
    reduction = _check_reduction(reduction)
    return _elementwise_loss(input, target, reduction, _mse_none, _mse_span, _mse_par, 2.0)


def binary_cross_entropy_with_logits(logits, target, reduction="mean"):
    """Sigmoid + binary cross-entropy, fused and stable for any finite ``logits``.

    ``target`` holds probabilities in [0, 1] with ``logits``' shape. Returns
    ``(loss, grad_logits)``, as
    ``torch.nn.functional.binary_cross_entropy_with_logits``.
    """
    _check_input_target(logits, target, "logits", "target")
    reduction = _check_reduction(reduction)
    return _elementwise_loss(logits, target, reduction, _bce_none, _bce_span, _bce_par, 1.0)


def _warmup(dt):
    """Compile every kernel above (serial and parallel variants) for dtype ``dt``."""
    x, g = np.zeros((2, 3), dt), np.empty((2, 3), dt)
    lab, per, one = np.zeros(2, np.int64), np.empty(2), dt.type(1)
    _softmax_ce_rows(x, lab, one, g, per, 0, 2)
    _softmax_ce_par(x, lab, one, g, per)
    _nll_rows(x, lab, one, g, per)
    xf, gf, perf, part = x.reshape(-1), g.reshape(-1), np.empty(6), np.empty(1)
    for none_kernel, span, par in ((_mse_none, _mse_span, _mse_par), (_bce_none, _bce_span, _bce_par)):
        none_kernel(xf, xf, gf, perf)
        span(xf, xf, one, gf, 0, 6)
        par(xf, xf, one, gf, part)

"""Weight penalties and their gradients: L1, L2 and elastic net.

Conventions (those of scikit-learn's ElasticNet, with ``lam`` as its alpha)::

    l1_penalty(w, lam)                  = lam * sum|w|
    l2_penalty(w, lam)                  = 0.5 * lam * sum w^2        (gradient lam * w)
    elastic_net_penalty(w, lam, r)      = lam * (r * sum|w| + 0.5 * (1 - r) * sum w^2)

The L1 gradient is the subgradient ``lam * sign(w)`` with sign(0) = 0. Penalties
sum in float64 over fixed-size blocks combined in order: the result does not
depend on the thread count.

The per-element math lives in ``@njit(inline='always')`` helpers that fused
optimizer updates call directly: :func:`reg_grad_elem` (l1 * sign(w) + l2 * w)
and :func:`sign0`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_out, check_same_dtype, check_scalar, check_shape, check_writeable
from ._codegen import zeros

_BLOCK = 16384  # elements per prange iteration (L1/L2-sized); the count depends only on w.size
_FM = {"reassoc", "contract", "nsz", "arcp"}


@njit(inline="always")
def sign0(w):
    """sign(w) with sign(0) = 0: the L1 subgradient every optimizer expects."""
    return np.sign(w)


@njit(inline="always")
def reg_grad_elem(w, l1, l2):
    """Gradient of ``l1 * |w| + 0.5 * l2 * w**2`` at one element (subgradient 0 at w = 0)."""
    return l1 * sign0(w) + l2 * w


@njit(cache=True, parallel=True, fastmath=_FM)
def _penalty_sums(w):
    """(sum |w|, sum w^2) in float64."""
    n = w.shape[0]
    nblocks = (n + _BLOCK - 1) // _BLOCK
    abs_part = zeros(nblocks, np.float64)
    sq_part = zeros(nblocks, np.float64)
    for b in prange(nblocks):
        sa = 0.0
        sq = 0.0
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            v = np.float64(w[i])
            sa += abs(v)
            sq += v * v
        abs_part[b] = sa
        sq_part[b] = sq
    sa = 0.0
    sq = 0.0
    for b in range(nblocks):
        sa += abs_part[b]
        sq += sq_part[b]
    return sa, sq


@njit(cache=True, parallel=True, fastmath={"contract"})
def _reg_grad_kernel(w, l1, l2, accumulate, out):
    """out = (out if accumulate else 0) + l1 * sign(w) + l2 * w."""
    n = w.shape[0]
    nblocks = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nblocks):
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            g = reg_grad_elem(w[i], l1, l2)
            out[i] = out[i] + g if accumulate else g


def _check_lam(lam, name="lam"):
    lam = check_scalar(lam, name)
    if lam < 0:
        raise ValueError(f"{name} must be >= 0, got {lam}")
    return lam


def _check_ratio(l1_ratio):
    r = check_scalar(l1_ratio, "l1_ratio")
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"l1_ratio must be in [0, 1], got {r}")
    return r


def _flat(w):
    return np.ascontiguousarray(w).reshape(-1)


def _penalty(w, l1, l2):
    check_array(w, "w")
    if w.size == 0:
        return 0.0
    sa, sq = _penalty_sums(_flat(w))
    return float(l1 * sa + 0.5 * l2 * sq)


def _grad(w, l1, l2, out):
    check_array(w, "w")
    if out is None:
        out = np.empty(w.shape, w.dtype)
    else:
        check_out(out, w.shape, w.dtype)
    if w.size:
        dt = w.dtype.type
        _reg_grad_kernel(_flat(w), dt(l1), dt(l2), False, out.reshape(-1))
    return out


def l1_penalty(w, lam):
    """``lam * sum(|w|)`` as a Python float. ``lam`` >= 0."""
    return _penalty(w, _check_lam(lam), 0.0)


def l1_grad(w, lam, out=None):
    """``lam * sign(w)`` (0 where w == 0); written into ``out`` (C-contiguous, w's shape/dtype) if given."""
    return _grad(w, _check_lam(lam), 0.0, out)


def l2_penalty(w, lam):
    """``0.5 * lam * sum(w**2)`` (the 1/2 makes the gradient ``lam * w``, as weight decay)."""
    return _penalty(w, 0.0, _check_lam(lam))


def l2_grad(w, lam, out=None):
    """``lam * w``; written into ``out`` if given."""
    return _grad(w, 0.0, _check_lam(lam), out)


def elastic_net_penalty(w, lam, l1_ratio):
    """``lam * (l1_ratio * sum|w| + 0.5 * (1 - l1_ratio) * sum w**2)``, l1_ratio in [0, 1]."""
    lam, r = _check_lam(lam), _check_ratio(l1_ratio)
    return _penalty(w, lam * r, lam * (1.0 - r))


def elastic_net_grad(w, lam, l1_ratio, out=None):
    """``lam * (l1_ratio * sign(w) + (1 - l1_ratio) * w)``; written into ``out`` if given."""
    lam, r = _check_lam(lam), _check_ratio(l1_ratio)
    return _grad(w, lam * r, lam * (1.0 - r), out)


def add_regularization_grad(grad, w, l1=0.0, l2=0.0):
    """In place: ``grad += l1 * sign(w) + l2 * w``, the gradient of ``l1*|w| + 0.5*l2*w**2``.

    ``grad`` must be a writeable C-contiguous array of w's shape and dtype (it
    may be ``w`` itself). Returns ``grad``.
    """
    check_array(grad, "grad")
    check_array(w, "w")
    check_same_dtype(grad=grad, w=w)
    check_shape(grad, w.shape, "grad", "the shape of w")
    check_writeable(grad, "grad")
    if not grad.flags.c_contiguous:
        raise ValueError("grad must be C-contiguous (it is updated in place)")
    l1, l2 = _check_lam(l1, "l1"), _check_lam(l2, "l2")
    if grad.size and (l1 or l2):
        dt = w.dtype.type
        if w is grad or not np.shares_memory(grad, w):
            src = _flat(w)
        else:  # another view of grad's memory: read a snapshot
            src = np.array(w, order="C").reshape(-1)
        _reg_grad_kernel(src, dt(l1), dt(l2), True, grad.reshape(-1))
    return grad


def _warmup(dt):
    """Compile the penalty and gradient kernels for dtype ``dt``."""
    w = np.ones(3, dt)
    elastic_net_penalty(w, 0.1, 0.5)
    add_regularization_grad(elastic_net_grad(w, 0.1, 0.5), w, 0.1, 0.1)

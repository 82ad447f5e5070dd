"""Batch normalization and dropout, each with its backward (torch.nn.functional semantics).

Batch norm views its input as (N, C, S): S = H*W for (N, C, H, W), L for
(N, C, L), 1 for (N, C). Channel statistics and the gradient sums are
reductions, parallel over channels so each prange iteration owns its channel's
outputs (race-free, and the summation order never depends on the thread count).
(N, C) is the exception: a channel there is a strided column, so row chunks
make partial sums that one serial loop combines in a fixed order. The
elementwise passes are parallel over (n, c) planes, or over rows for (N, C).
Sums are accumulated in float64 for both dtypes.

Dropout draws its mask from a counter-based hash of (seed, element index), so a
seed gives the same mask for any thread count and any block schedule.
"""
from __future__ import annotations

import numbers

import numpy as np
from numba import njit, prange

from ._checks import (
    check_array,
    check_same_dtype,
    check_scalar,
    check_shape,
    check_vector,
    check_writeable,
)
from ._codegen import zeros

# Reassociation lets LLVM vectorize the float64 sums. The compiled order is
# fixed, so results stay deterministic; NaN/Inf semantics are kept.
_FM = {"reassoc", "contract", "nsz", "arcp"}

# Rows per prange iteration of the (N, C) reductions: 64 rows x a few hundred
# channels is an L2-resident chunk. The chunk count depends only on N.
_ROW_CHUNK = 64


# ----------------------------------------------------------------------------- batch norm

@njit(inline="always")
def _finish_channel(c, mean, var, count, gamma, beta, running_mean, running_var,
                    update, momentum, eps, save_mean, save_invstd, scale, shift):
    """Per-channel epilogue of the training statistics: running stats, invstd, affine."""
    if update:
        # torch keeps the unbiased variance in running_var.
        unbiased = var * count / (count - 1)
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * unbiased
    invstd = 1.0 / np.sqrt(var + eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    scale[c] = gamma[c] * invstd
    shift[c] = beta[c]


@njit(cache=True, parallel=True, fastmath=_FM)
def _bn_train_stats_planes(x, gamma, beta, running_mean, running_var, update, momentum, eps,
                           save_mean, save_invstd, scale, shift):
    n, nc, s = x.shape
    count = n * s
    for c in prange(nc):
        acc = 0.0
        for i in range(n):
            for k in range(s):
                acc += x[i, c, k]
        mean = acc / count
        acc2 = 0.0
        for i in range(n):
            for k in range(s):
                d = x[i, c, k] - mean
                acc2 += d * d
        _finish_channel(c, mean, acc2 / count, count, gamma, beta, running_mean, running_var,
                        update, momentum, eps, save_mean, save_invstd, scale, shift)


@njit(cache=True, parallel=True, fastmath=_FM)
def _bn_train_stats_rows(x, gamma, beta, running_mean, running_var, update, momentum, eps,
                         save_mean, save_invstd, scale, shift):
    n, nc = x.shape
    nchunks = (n + _ROW_CHUNK - 1) // _ROW_CHUNK
    means = zeros((nchunks, nc), np.float64)
    m2s = zeros((nchunks, nc), np.float64)
    for b in prange(nchunks):
        r0, r1 = b * _ROW_CHUNK, min(n, (b + 1) * _ROW_CHUNK)
        m, m2 = means[b], m2s[b]
        for i in range(r0, r1):
            for c in range(nc):
                m[c] += x[i, c]
        for c in range(nc):
            m[c] /= r1 - r0
        for i in range(r0, r1):
            for c in range(nc):
                d = x[i, c] - m[c]
                m2[c] += d * d
    # Chan et al.'s pairwise update merges the chunks' (count, mean, M2) stably.
    for c in range(nc):
        mean, m2, cnt = means[0, c], m2s[0, c], min(n, _ROW_CHUNK)
        for b in range(1, nchunks):
            nb = min(n, (b + 1) * _ROW_CHUNK) - b * _ROW_CHUNK
            delta = means[b, c] - mean
            tot = cnt + nb
            mean += delta * nb / tot
            m2 += m2s[b, c] + delta * delta * cnt * nb / tot
            cnt = tot
        _finish_channel(c, mean, m2 / n, n, gamma, beta, running_mean, running_var,
                        update, momentum, eps, save_mean, save_invstd, scale, shift)


@njit(cache=True)
def _bn_eval_stats(gamma, beta, running_mean, running_var, eps, save_mean, save_invstd, scale, shift):
    for c in range(gamma.shape[0]):
        invstd = 1.0 / np.sqrt(np.float64(running_var[c]) + eps)
        save_mean[c] = running_mean[c]
        save_invstd[c] = invstd
        scale[c] = gamma[c] * invstd
        shift[c] = beta[c]


@njit(cache=True, parallel=True, fastmath={"contract"})
def _bn_apply_planes(x, mean, scale, shift, y):
    """y = (x - mean[c]) * scale[c] + shift[c], one (n, c) plane per iteration."""
    n, nc, s = x.shape
    for p in prange(n * nc):
        i, c = p // nc, p % nc
        m, a, b = mean[c], scale[c], shift[c]
        for k in range(s):
            y[i, c, k] = (x[i, c, k] - m) * a + b


@njit(cache=True, parallel=True, fastmath={"contract"})
def _bn_apply_rows(x, mean, scale, shift, y):
    n, nc = x.shape
    for i in prange(n):
        for c in range(nc):
            y[i, c] = (x[i, c] - mean[c]) * scale[c] + shift[c]


@njit(inline="always")
def _backward_coefficients(c, sum_gy, sum_gy_xmu, count, gamma, save_invstd, training,
                           grad_gamma, grad_beta, coef_gy, coef_xmu, coef_const):
    """grad_x = grad_y * coef_gy + (x - mean) * coef_xmu + coef_const for channel c."""
    invstd = np.float64(save_invstd[c])
    gg = sum_gy_xmu * invstd
    grad_gamma[c] = gg
    grad_beta[c] = sum_gy
    k = gamma[c] * invstd
    coef_gy[c] = k
    if training:
        # Batch statistics depend on x: subtract the projections on 1 and x_hat.
        coef_xmu[c] = -k * invstd * gg / count
        coef_const[c] = -k * sum_gy / count
    else:
        coef_xmu[c] = 0.0
        coef_const[c] = 0.0


@njit(cache=True, parallel=True, fastmath=_FM)
def _bn_backward_sums_planes(grad_y, x, gamma, save_mean, save_invstd, training,
                             grad_gamma, grad_beta, coef_gy, coef_xmu, coef_const):
    n, nc, s = x.shape
    for c in prange(nc):
        m = np.float64(save_mean[c])
        sg = 0.0
        sgx = 0.0
        for i in range(n):
            for k in range(s):
                g = grad_y[i, c, k]
                sg += g
                sgx += g * (x[i, c, k] - m)
        _backward_coefficients(c, sg, sgx, n * s, gamma, save_invstd, training,
                               grad_gamma, grad_beta, coef_gy, coef_xmu, coef_const)


@njit(cache=True, parallel=True, fastmath=_FM)
def _bn_backward_sums_rows(grad_y, x, gamma, save_mean, save_invstd, training,
                           grad_gamma, grad_beta, coef_gy, coef_xmu, coef_const):
    n, nc = x.shape
    nchunks = (n + _ROW_CHUNK - 1) // _ROW_CHUNK
    sgs = zeros((nchunks, nc), np.float64)
    sgxs = zeros((nchunks, nc), np.float64)
    mean = save_mean.astype(np.float64)
    for b in prange(nchunks):
        sg, sgx = sgs[b], sgxs[b]
        for i in range(b * _ROW_CHUNK, min(n, (b + 1) * _ROW_CHUNK)):
            for c in range(nc):
                g = grad_y[i, c]
                sg[c] += g
                sgx[c] += g * (x[i, c] - mean[c])
    for c in range(nc):
        sg = 0.0
        sgx = 0.0
        for b in range(nchunks):
            sg += sgs[b, c]
            sgx += sgxs[b, c]
        _backward_coefficients(c, sg, sgx, n, gamma, save_invstd, training,
                               grad_gamma, grad_beta, coef_gy, coef_xmu, coef_const)


@njit(cache=True, parallel=True, fastmath={"contract"})
def _bn_backward_apply_planes(grad_y, x, mean, coef_gy, coef_xmu, coef_const, grad_x):
    n, nc, s = x.shape
    for p in prange(n * nc):
        i, c = p // nc, p % nc
        m, a, b, d = mean[c], coef_gy[c], coef_xmu[c], coef_const[c]
        for k in range(s):
            grad_x[i, c, k] = grad_y[i, c, k] * a + (x[i, c, k] - m) * b + d


@njit(cache=True, parallel=True, fastmath={"contract"})
def _bn_backward_apply_rows(grad_y, x, mean, coef_gy, coef_xmu, coef_const, grad_x):
    n, nc = x.shape
    for i in prange(n):
        for c in range(nc):
            grad_x[i, c] = grad_y[i, c] * coef_gy[c] + (x[i, c] - mean[c]) * coef_xmu[c] + coef_const[c]


def _as_ncs(x):
    """Contiguous (N, C, S) view, or (N, C) for 2-D input."""
    x = np.ascontiguousarray(x)
    return x if x.ndim == 2 else x.reshape(x.shape[0], x.shape[1], -1)


def _channel_param(v, default, name, c, dtype):
    if v is None:
        return np.full(c, default, dtype)
    return np.ascontiguousarray(check_vector(v, name, c, "the channel dimension of x"))


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5,
               return_stats=False):
    """Batch normalization over every axis but the channel axis 1.

    Args:
        x: (N, C), (N, C, L) or (N, C, H, W), float32/float64.
        gamma, beta: (C,) scale and shift, or None (affine=False: 1 and 0).
        running_mean, running_var: (C,) running statistics. In training they are
            updated in place: ``r = (1 - momentum) * r + momentum * batch_stat``,
            with the *unbiased* batch variance for ``running_var`` (as torch).
            May be None in training (no running statistics are tracked); required
            in evaluation, where they normalize instead of the batch statistics.
        training: use batch statistics (True) or the running statistics (False).
        momentum: in [0, 1]. eps: > 0, added to the variance.
        return_stats: also return ``save_mean`` and ``save_invstd`` (C,), the
            mean and 1/sqrt(var + eps) used, for :func:`batch_norm_backward`.

    Returns:
        y (same shape as x), or (y, save_mean, save_invstd).

    Raises:
        TypeError: non-float or mixed dtypes. ValueError: wrong ndim, parameter or
        running statistic of the wrong length, a single value per channel in
        training, momentum outside [0, 1], eps <= 0.
    """
    check_array(x, "x", (2, 3, 4))
    nc = x.shape[1]
    training = bool(training)
    momentum = check_scalar(momentum, "momentum")
    eps = check_scalar(eps, "eps")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if eps <= 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if running_mean is None and not training:
        raise ValueError("evaluation mode (training=False) needs running_mean and running_var")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is not None:
            check_vector(v, name, nc, "the channel dimension of x")
            if training:
                check_writeable(v, name)
    check_same_dtype(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    dt = x.dtype
    g = _channel_param(gamma, 1.0, "gamma", nc, dt)
    b = _channel_param(beta, 0.0, "beta", nc, dt)
    count = x.size // nc if nc else 0
    if training and count <= 1:
        raise ValueError(f"batch_norm in training needs more than 1 value per channel, got x.shape={x.shape}")

    save_mean, save_invstd = np.empty(nc, dt), np.empty(nc, dt)
    scale, shift = np.empty(nc, dt), np.empty(nc, dt)
    x3 = _as_ncs(x)
    if training:
        update = running_mean is not None
        rm = np.ascontiguousarray(running_mean) if update else save_mean[:0]
        rv = np.ascontiguousarray(running_var) if update else save_mean[:0]
        stats = _bn_train_stats_rows if x3.ndim == 2 else _bn_train_stats_planes
        stats(x3, g, b, rm, rv, update, momentum, eps, save_mean, save_invstd, scale, shift)
        if update and rm is not running_mean:  # strided running stats: write back
            running_mean[...] = rm
        if update and rv is not running_var:
            running_var[...] = rv
    else:
        _bn_eval_stats(g, b, np.ascontiguousarray(running_mean), np.ascontiguousarray(running_var),
                       eps, save_mean, save_invstd, scale, shift)
    y3 = np.empty_like(x3)
    if y3.size:
        apply = _bn_apply_rows if x3.ndim == 2 else _bn_apply_planes
        apply(x3, save_mean, scale, shift, y3)
    y = y3.reshape(x.shape)
    return (y, save_mean, save_invstd) if return_stats else y


def batch_norm_backward(grad_y, x, gamma, save_mean, save_invstd, training=True):
    """Gradients of :func:`batch_norm`: ``(grad_x, grad_gamma, grad_beta)``.

    ``save_mean``/``save_invstd`` are what ``batch_norm(..., return_stats=True)``
    returned; in evaluation mode (``training=False``) they are the running
    statistics as ``(running_mean, 1/sqrt(running_var + eps))`` and
    ``grad_x = grad_y * gamma * invstd``. ``gamma`` None means 1. ``grad_gamma``
    and ``grad_beta`` are always computed (they are by-products of the sums).
    """
    check_array(x, "x", (2, 3, 4))
    check_array(grad_y, "grad_y", (2, 3, 4))
    check_shape(grad_y, x.shape, "grad_y", "the shape of x")
    nc = x.shape[1]
    for name, v in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if v is None:
            raise ValueError(f"{name} is required (batch_norm(..., return_stats=True) returns it)")
        check_vector(v, name, nc, "the channel dimension of x")
    check_same_dtype(grad_y=grad_y, x=x, gamma=gamma, save_mean=save_mean, save_invstd=save_invstd)
    dt = x.dtype
    g = _channel_param(gamma, 1.0, "gamma", nc, dt)
    mean = np.ascontiguousarray(save_mean)
    invstd = np.ascontiguousarray(save_invstd)
    grad_gamma, grad_beta = np.zeros(nc, dt), np.zeros(nc, dt)
    coef_gy, coef_xmu, coef_const = np.empty(nc, dt), np.empty(nc, dt), np.empty(nc, dt)
    x3, gy3 = _as_ncs(x), _as_ncs(grad_y)
    grad_x = np.empty_like(x3)
    if x.size == 0:
        grad_x.fill(0)
        return grad_x.reshape(x.shape), grad_gamma, grad_beta
    rows = x3.ndim == 2
    sums = _bn_backward_sums_rows if rows else _bn_backward_sums_planes
    sums(gy3, x3, g, mean, invstd, bool(training), grad_gamma, grad_beta, coef_gy, coef_xmu, coef_const)
    apply = _bn_backward_apply_rows if rows else _bn_backward_apply_planes
    apply(gy3, x3, mean, coef_gy, coef_xmu, coef_const, grad_x)
    return grad_x.reshape(x.shape), grad_gamma, grad_beta


# ----------------------------------------------------------------------------- dropout

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_DROPOUT_BLOCK = 16384  # elements per prange iteration: amortizes scheduling, L1/L2-sized


@njit(inline="always")
def _splitmix64(z):
    """Finalizer of splitmix64 (Steele et al.): a bijective, well-mixed uint64 hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, parallel=True)
def _dropout_kernel(x, key, threshold, scale, y, mask):
    """Element i is dropped when the top 53 bits of hash(key + i*golden) fall below threshold."""
    n = x.shape[0]
    zero = scale - scale
    nblocks = (n + _DROPOUT_BLOCK - 1) // _DROPOUT_BLOCK
    for blk in prange(nblocks):
        for i in range(blk * _DROPOUT_BLOCK, min(n, (blk + 1) * _DROPOUT_BLOCK)):
            h = _splitmix64(key + np.uint64(i + 1) * _GOLDEN)
            keep = (h >> np.uint64(11)) >= threshold
            mask[i] = np.uint8(keep)
            v = x[i] * scale
            y[i] = v if keep else zero


@njit(cache=True, parallel=True)
def _dropout_backward_kernel(grad_y, mask, scale, grad_x):
    n = grad_y.shape[0]
    zero = scale - scale
    nblocks = (n + _DROPOUT_BLOCK - 1) // _DROPOUT_BLOCK
    for blk in prange(nblocks):
        for i in range(blk * _DROPOUT_BLOCK, min(n, (blk + 1) * _DROPOUT_BLOCK)):
            v = grad_y[i] * scale
            grad_x[i] = v if mask[i] != 0 else zero


def _mix_seed(seed):
    """splitmix64 of the seed in Python ints, so that nearby seeds give unrelated streams."""
    m = (1 << 64) - 1
    z = (seed ^ (seed >> 30)) * 0xBF58476D1CE4E5B9 & m
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & m
    return z ^ (z >> 31)


def _check_p(p):
    p = check_scalar(p, "p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    return p


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def dropout(x, p, seed, training=True):
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1/(1-p).

    Args:
        x: float32/float64 array of any shape.
        p: drop probability in [0, 1).
        seed: int in [0, 2**64). The mask is a pure function of (seed, element
            index): identical for any thread count.
        training: when False (or p == 0) y is a copy of x and the mask all ones.

    Returns:
        (y, mask): y like x (C-contiguous), mask a uint8 array of x's shape
        (1 = kept), to pass to :func:`dropout_backward`.
    """
    check_array(x, "x")
    p = _check_p(p)
    seed = _check_seed(seed)
    if not training or p == 0.0:
        return np.array(x, order="C", copy=True), np.ones(x.shape, np.uint8)
    xf = np.ascontiguousarray(x).reshape(-1)
    y = np.empty_like(xf)
    mask = np.empty(xf.shape, np.uint8)
    key = np.uint64(_mix_seed(seed))
    threshold = np.uint64(int(np.ceil(p * 2.0**53)))
    if xf.size:
        _dropout_kernel(xf, key, threshold, x.dtype.type(1.0 / (1.0 - p)), y, mask)
    return y.reshape(x.shape), mask.reshape(x.shape)


def dropout_backward(grad_y, mask, p):
    """Gradient of :func:`dropout`: ``grad_y * mask / (1 - p)``.

    ``mask`` is the uint8 (or bool) mask :func:`dropout` returned, of grad_y's shape.
    """
    check_array(grad_y, "grad_y")
    p = _check_p(p)
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy.ndarray, got {type(mask).__name__}")
    if mask.dtype not in (np.uint8, np.bool_):
        raise TypeError(f"mask must be uint8 or bool, got dtype {mask.dtype}")
    check_shape(mask, grad_y.shape, "mask", "the shape of grad_y")
    gf = np.ascontiguousarray(grad_y).reshape(-1)
    mf = np.ascontiguousarray(mask).reshape(-1).view(np.uint8)
    grad_x = np.empty_like(gf)
    if gf.size:
        _dropout_backward_kernel(gf, mf, grad_y.dtype.type(1.0 / (1.0 - p)), grad_x)
    return grad_x.reshape(grad_y.shape)


def _warmup(dt):
    """Compile the batch norm ((N, C) and (N, C, ...)) and dropout kernels for dtype ``dt``."""
    for shape in ((4, 2), (4, 2, 3)):
        x, v = np.ones(shape, dt), np.ones(2, dt)
        y, m, s = batch_norm(x, v, v, v.copy(), v.copy(), True, return_stats=True)
        batch_norm(x, v, v, v, v, False)
        batch_norm_backward(y, x, v, m, s)
    y, mask = dropout(np.ones(3, dt), 0.5, 0)
    dropout_backward(y, mask, 0.5)

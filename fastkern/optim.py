"""Fused optimizer updates: ``sgd_update``, ``adam_update``, ``rmsprop_update``.

Each call is ONE pass over a parameter: the regularization terms, the moment
updates and the parameter write happen per element in registers, with no
temporaries. They follow ``torch.optim``'s single-tensor formulas term for
term, in the parameter's dtype (scalars are cast to it, as torch does).

Regularization (added to the gradient before anything else, as torch's
``weight_decay`` is):

* ``weight_decay``: coupled L2, ``g += weight_decay * p`` (the gradient of
  ``weight_decay/2 * ||p||^2``).
* ``l1``: ``g += l1 * sign(p)`` (the subgradient of ``l1 * ||p||_1``).
  Both together give elastic-net.
* ``decoupled_weight_decay`` (Adam only; AdamW's): ``p *= 1 - lr * wd`` first.

State arrays a configuration does not use (the momentum buffer with
``momentum=0``, AMSGrad's maximum, RMSprop's centered average) may be ``None``.

Big parameters run over all threads, each thread on its own contiguous
slice; small ones run serially, where a thread launch would cost more than
the update.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._checks import FLOAT_DTYPES, check_scalar
from .regularization import reg_grad_elem

# From this many elements (128 KiB of float32) on, all threads share the update.
# In cache, two threads break even with one at about 32K elements and take 0.6x
# the time at 128K; in a training step, where the optimizer state comes back from
# L3, updating LeNet-5's 48K-element Linear(400, 120) weight on two threads made
# the whole step 1.4% faster (interleaved A/B, twice), against 1 << 18 here.
PARALLEL_MIN_SIZE = 1 << 15


# ---------------------------------------------------------------- element rules

@njit(cache=True, inline="always")
def _regularized(p, g, weight_decay, l1):
    # The penalties' gradient, l1*sign(p) + weight_decay*p, shared with fastkern.regularization.
    # Without penalties the gradient is used as it is, as in torch (0 * p is NaN at p = inf).
    if weight_decay == 0 and l1 == 0:
        return g
    return g + reg_grad_elem(p, l1, weight_decay)


@njit(cache=True, inline="always")
def _lerp(a, b, w, one_minus_w):
    # torch.lerp: the two-sided form keeps the result exact at both ends.
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * one_minus_w


# ------------------------------------------------------------------------- SGD

@njit(cache=True, inline="always")
def _sgd_elem(param, grad, buf, i, lr, momentum, one_minus_dampening, nesterov, weight_decay, l1,
              first_step, use_buf):
    p = param[i]
    d = _regularized(p, grad[i], weight_decay, l1)
    if use_buf:
        b = d if first_step else momentum * buf[i] + one_minus_dampening * d
        buf[i] = b
        d = d + momentum * b if nesterov else b
    param[i] = p - lr * d


@njit(cache=True, inline="always")
def _plain_momentum(hp):
    # momentum without Nesterov, first step or penalties: the usual case, with a loop of its own
    return hp[7] != 0 and hp[5] == 0 and hp[6] == 0 and hp[3] == 0 and hp[4] == 0


@njit(cache=True, inline="always")
def _momentum_elem(param, grad, buf, i, lr, momentum, omd):
    # _sgd_elem's arithmetic for _plain_momentum, without its branches: a loop of these
    # vectorizes (1.8x faster on an L2-resident parameter)
    b = momentum * buf[i] + omd * grad[i]
    buf[i] = b
    param[i] = param[i] - lr * b


@njit(cache=True)
def _sgd_serial(param, grad, buf, hp):
    lr, momentum, omd, wd, l1 = hp[0], hp[1], hp[2], hp[3], hp[4]
    nesterov, first_step, use_buf = hp[5] != 0, hp[6] != 0, hp[7] != 0
    if _plain_momentum(hp):
        for i in range(param.size):
            _momentum_elem(param, grad, buf, i, lr, momentum, omd)
        return
    for i in range(param.size):
        _sgd_elem(param, grad, buf, i, lr, momentum, omd, nesterov, wd, l1, first_step, use_buf)


@njit(cache=True, parallel=True)
def _sgd_parallel(param, grad, buf, hp):
    lr, momentum, omd, wd, l1 = hp[0], hp[1], hp[2], hp[3], hp[4]
    nesterov, first_step, use_buf = hp[5] != 0, hp[6] != 0, hp[7] != 0
    if _plain_momentum(hp):
        for i in prange(param.size):
            _momentum_elem(param, grad, buf, i, lr, momentum, omd)
    else:
        for i in prange(param.size):
            _sgd_elem(param, grad, buf, i, lr, momentum, omd, nesterov, wd, l1, first_step, use_buf)


# ------------------------------------------------------------------------ Adam

@njit(cache=True, inline="always")
def _adam_elem(param, grad, m, v, vmax, i, lr_decay, step_size, beta1, omb1, beta2, omb2,
               bc2_sqrt, eps, weight_decay, l1, amsgrad):
    p = param[i] * lr_decay
    g = _regularized(param[i], grad[i], weight_decay, l1)
    mi = _lerp(m[i], g, omb1, beta1)
    vi = beta2 * v[i] + omb2 * g * g
    m[i] = mi
    v[i] = vi
    if amsgrad:
        vi = max(vmax[i], vi)
        vmax[i] = vi
    denom = math.sqrt(vi) / bc2_sqrt + eps
    param[i] = p - step_size * (mi / denom)


@njit(cache=True)
def _adam_serial(param, grad, m, v, vmax, hp):
    lr_decay, step_size, beta1, omb1, beta2, omb2 = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5]
    bc2_sqrt, eps, wd, l1, amsgrad = hp[6], hp[7], hp[8], hp[9], hp[10] != 0
    for i in range(param.size):
        _adam_elem(param, grad, m, v, vmax, i, lr_decay, step_size, beta1, omb1, beta2, omb2,
                   bc2_sqrt, eps, wd, l1, amsgrad)


@njit(cache=True, parallel=True)
def _adam_parallel(param, grad, m, v, vmax, hp):
    lr_decay, step_size, beta1, omb1, beta2, omb2 = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5]
    bc2_sqrt, eps, wd, l1, amsgrad = hp[6], hp[7], hp[8], hp[9], hp[10] != 0
    for i in prange(param.size):
        _adam_elem(param, grad, m, v, vmax, i, lr_decay, step_size, beta1, omb1, beta2, omb2,
                   bc2_sqrt, eps, wd, l1, amsgrad)


# --------------------------------------------------------------------- RMSprop

@njit(cache=True, inline="always")
def _rmsprop_elem(param, grad, sq, gavg, buf, i, lr, alpha, oma, eps, weight_decay, l1, momentum,
                  centered, use_buf):
    p = param[i]
    g = _regularized(p, grad[i], weight_decay, l1)
    s = alpha * sq[i] + oma * g * g
    sq[i] = s
    if centered:
        a = _lerp(gavg[i], g, oma, alpha)
        gavg[i] = a
        avg = math.sqrt(s - a * a) + eps
    else:
        avg = math.sqrt(s) + eps
    if use_buf:
        b = momentum * buf[i] + g / avg
        buf[i] = b
        param[i] = p - lr * b
    else:
        param[i] = p - lr * (g / avg)


@njit(cache=True)
def _rmsprop_serial(param, grad, sq, gavg, buf, hp):
    lr, alpha, oma, eps, wd, l1, momentum = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]
    centered, use_buf = hp[7] != 0, hp[8] != 0
    for i in range(param.size):
        _rmsprop_elem(param, grad, sq, gavg, buf, i, lr, alpha, oma, eps, wd, l1, momentum,
                      centered, use_buf)


@njit(cache=True, parallel=True)
def _rmsprop_parallel(param, grad, sq, gavg, buf, hp):
    lr, alpha, oma, eps, wd, l1, momentum = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]
    centered, use_buf = hp[7] != 0, hp[8] != 0
    for i in prange(param.size):
        _rmsprop_elem(param, grad, sq, gavg, buf, i, lr, alpha, oma, eps, wd, l1, momentum,
                      centered, use_buf)


# ------------------------------------------------------------- Python boundary
# These checks run once per parameter per step, so they stay cheap: exact-type
# fast paths, one reshape per array, no temporaries beyond the scalar pack.

_F32, _F64 = FLOAT_DTYPES
_EMPTY = {_F32: np.empty(0, np.float32), _F64: np.empty(0, np.float64)}


def _flat(arr, name, like):
    """A 1-D plain view of a state array shaped like ``like`` and updated in place."""
    if type(arr) is np.ndarray and arr.dtype is like.dtype and arr.shape == like.shape:
        flags = arr.flags
        if flags.c_contiguous and flags.writeable:  # the usual case, in a third of the time
            return arr.ravel()
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.shape != like.shape or arr.dtype != like.dtype:
        raise ValueError(
            f"{name} must match param (shape {like.shape}, dtype {like.dtype}), "
            f"got shape {arr.shape}, dtype {arr.dtype}"
        )
    flags = arr.flags
    if not (flags.c_contiguous and flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array (it is updated in place)")
    if type(arr) is not np.ndarray:
        arr = arr.view(np.ndarray)
    return arr.reshape(-1)


def _flat_state(param, name, arr, needed):
    """``_flat`` for a state array, or an empty stand-in when the configuration does not use it."""
    return _flat(arr, name, param) if needed else _EMPTY[param.dtype]


def _flat_param_grad(param, grad):
    if type(param) is np.ndarray and (param.dtype is _F32 or param.dtype is _F64):
        p = _flat(param, "param", param)
        if type(grad) is np.ndarray and grad.dtype is param.dtype and grad.shape == param.shape \
                and grad.flags.c_contiguous:
            return p, grad.ravel()
    if not isinstance(param, np.ndarray) or param.dtype not in FLOAT_DTYPES:
        what = type(param).__name__ + (f" of dtype {param.dtype}" if isinstance(param, np.ndarray) else "")
        raise TypeError(f"param must be a float32 or float64 numpy.ndarray, got {what}")
    p = _flat(param, "param", param)
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"grad must be a numpy.ndarray, got {type(grad).__name__}")
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(
            f"grad must match param (shape {param.shape}, dtype {param.dtype}), "
            f"got shape {grad.shape}, dtype {grad.dtype}"
        )
    if not grad.flags.c_contiguous:
        grad = np.ascontiguousarray(grad)
    if type(grad) is not np.ndarray:
        grad = grad.view(np.ndarray)
    # Kernels see plain 1-D arrays: one compiled signature per dtype, whatever the rank.
    return p, grad.reshape(-1)


def _non_negative(value, name):
    if type(value) is not float or not 0.0 <= value < math.inf:
        value = check_scalar(value, name)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _in_unit(value, name, closed=False):
    if type(value) is not float or not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        value = check_scalar(value, name)
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
    return value


def _sgd_hyper(dtype, lr, momentum, dampening, nesterov, weight_decay, l1, first_step):
    """sgd_update's checked scalars as its kernels take them, and whether a buffer is used."""
    lr = _non_negative(lr, "lr")
    momentum = _non_negative(momentum, "momentum")
    if type(dampening) is not float:
        dampening = check_scalar(dampening, "dampening")
    weight_decay = _non_negative(weight_decay, "weight_decay")
    l1 = _non_negative(l1, "l1")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
    use_buf = momentum != 0.0
    return np.array([lr, momentum, 1.0 - dampening, weight_decay, l1, nesterov, first_step, use_buf],
                    dtype), use_buf


def _sgd_run(p, g, buf, hp):
    (_sgd_parallel if p.size >= PARALLEL_MIN_SIZE else _sgd_serial)(p, g, buf, hp)


def sgd_update(param, grad, momentum_buffer=None, *, lr, momentum=0.0, dampening=0.0,
               nesterov=False, weight_decay=0.0, l1=0.0, first_step=False):
    """One in-place SGD step on ``param`` (torch.optim.SGD's formula).

    ``d = grad + weight_decay*param + l1*sign(param)``; with ``momentum`` > 0,
    ``buf = d`` on the first step (``first_step=True``) and
    ``buf = momentum*buf + (1-dampening)*d`` after, then ``d = d + momentum*buf``
    (``nesterov``) or ``d = buf``; finally ``param -= lr*d``.
    ``momentum_buffer`` (same shape/dtype as ``param``) is updated in place.
    """
    p, g = _flat_param_grad(param, grad)
    hp, use_buf = _sgd_hyper(p.dtype, lr, momentum, dampening, nesterov, weight_decay, l1, first_step)
    _sgd_run(p, g, _flat_state(param, "momentum_buffer", momentum_buffer, use_buf), hp)
    return param


def _adam_hyper(dtype, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, l1, amsgrad):
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    lr = _non_negative(lr, "lr")
    beta1 = _in_unit(beta1, "beta1")
    beta2 = _in_unit(beta2, "beta2")
    eps = _non_negative(eps, "eps")
    weight_decay = _non_negative(weight_decay, "weight_decay")
    decoupled_weight_decay = _non_negative(decoupled_weight_decay, "decoupled_weight_decay")
    l1 = _non_negative(l1, "l1")
    # Scalar bias corrections in double precision, as torch computes them in Python.
    step_size = lr / (1.0 - beta1 ** step)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    return np.array([1.0 - lr * decoupled_weight_decay, step_size, beta1, 1.0 - beta1, beta2,
                     1.0 - beta2, bc2_sqrt, eps, weight_decay, l1, amsgrad], dtype)


def _adam_run(p, g, m, v, vmax, hp):
    (_adam_parallel if p.size >= PARALLEL_MIN_SIZE else _adam_serial)(p, g, m, v, vmax, hp)


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=0.0,
                l1=0.0, amsgrad=False):
    """One in-place Adam/AdamW step (torch.optim.Adam / AdamW's formula).

    ``step`` is the 1-based step count used for bias correction.
    ``weight_decay`` is Adam's coupled L2 (added to the gradient);
    ``decoupled_weight_decay`` is AdamW's (``param *= 1 - lr*wd`` first).
    ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``) are
    updated in place.
    """
    p, g = _flat_param_grad(param, grad)
    hp = _adam_hyper(p.dtype, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, l1, amsgrad)
    _adam_run(p, g, _flat_state(param, "exp_avg", exp_avg, True), _flat_state(param, "exp_avg_sq", exp_avg_sq, True),
              _flat_state(param, "max_exp_avg_sq", max_exp_avg_sq, bool(amsgrad)), hp)
    return param


def _rmsprop_hyper(dtype, lr, alpha, eps, weight_decay, l1, momentum, centered):
    lr = _non_negative(lr, "lr")
    alpha = _in_unit(alpha, "alpha", closed=True)
    eps = _non_negative(eps, "eps")
    weight_decay = _non_negative(weight_decay, "weight_decay")
    l1 = _non_negative(l1, "l1")
    momentum = _non_negative(momentum, "momentum")
    use_buf = momentum > 0.0
    return np.array([lr, alpha, 1.0 - alpha, eps, weight_decay, l1, momentum, centered, use_buf],
                    dtype), use_buf


def _rmsprop_run(p, g, sq, gavg, buf, hp):
    (_rmsprop_parallel if p.size >= PARALLEL_MIN_SIZE else _rmsprop_serial)(p, g, sq, gavg, buf, hp)


def rmsprop_update(param, grad, square_avg, grad_avg=None, momentum_buffer=None, *, lr=1e-2,
                   alpha=0.99, eps=1e-8, weight_decay=0.0, l1=0.0, momentum=0.0, centered=False):
    """One in-place RMSprop step (torch.optim.RMSprop's formula).

    ``square_avg`` always, ``grad_avg`` with ``centered`` and ``momentum_buffer``
    with ``momentum`` > 0 are updated in place.
    """
    p, g = _flat_param_grad(param, grad)
    hp, use_buf = _rmsprop_hyper(p.dtype, lr, alpha, eps, weight_decay, l1, momentum, centered)
    _rmsprop_run(p, g, _flat_state(param, "square_avg", square_avg, True),
                 _flat_state(param, "grad_avg", grad_avg, bool(centered)),
                 _flat_state(param, "momentum_buffer", momentum_buffer, use_buf), hp)
    return param


# ------------------------------------------------------------- many parameters at once
# A training step updates every parameter with the same scalars: checking those once, and
# then each parameter's arrays only, took a LeNet-5 step's ten SGD updates (in cache) from
# 48 us as ten sgd_update calls to 36 us as one call. The kernels and results are the same.

def _lists(params, **states):
    """``params`` and each state list checked to be equal-length lists or tuples (a state of
    None: that many Nones, for a configuration that does not use it)."""
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list or tuple of arrays, got {type(params).__name__}")
    out = []
    for name, arrays in states.items():
        if arrays is None:
            arrays = (None,) * len(params)
        elif not isinstance(arrays, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of arrays, got {type(arrays).__name__}")
        elif len(arrays) != len(params):
            raise ValueError(f"{name} has {len(arrays)} arrays for {len(params)} params")
        out.append(arrays)
    return out


def _checked(i, check, *args):
    """``check(*args)``, its error naming parameter ``i``."""
    try:
        return check(*args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"params[{i}]: {e}") from None


def _foreach(params, make, check, run, **states):
    """The foreach driver: the state lists checked against ``params``, the scalars packed by
    ``make(dtype)`` once per float dtype among them, every parameter's arrays by ``check``
    (errors naming the parameter), and only then ``run(*arrays, scalars)`` on each."""
    lists = _lists(params, **states)
    dtypes = {p.dtype for p in params if isinstance(p, np.ndarray) and p.dtype in FLOAT_DTYPES}
    hps = {dt: make(dt) for dt in dtypes or {_F32}}
    work = [_checked(i, check, params[i], *(lst[i] for lst in lists)) for i in range(len(params))]
    for arrays in work:
        run(*arrays, hps[arrays[0].dtype])
    return params


def sgd_update_foreach(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
                       nesterov=False, weight_decay=0.0, l1=0.0, first_step=False):
    """:func:`sgd_update` on each parameter of a list with the same scalars (torch's ``foreach``).

    ``params``, ``grads`` and, with momentum, ``momentum_buffers`` are lists (or
    tuples) of equal length, their i-th arrays as :func:`sgd_update` takes them.
    Everything is checked before any parameter changes; the result is that of
    one :func:`sgd_update` per parameter, bit for bit.
    """
    def make(dt):
        return _sgd_hyper(dt, lr, momentum, dampening, nesterov, weight_decay, l1, first_step)[0]

    def check(p, g, b):
        return _flat_param_grad(p, g) + (_flat_state(p, "momentum_buffer", b, momentum != 0.0),)

    return _foreach(params, make, check, _sgd_run, grads=grads, momentum_buffers=momentum_buffers)


def adam_update_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
                        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=0.0,
                        l1=0.0, amsgrad=False):
    """:func:`adam_update` on each parameter of a list with the same scalars and ``step``
    (torch's ``foreach``); the lists as in :func:`sgd_update_foreach`."""
    def make(dt):
        return _adam_hyper(dt, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, l1, amsgrad)

    def check(p, g, m, v, vmax):
        return _flat_param_grad(p, g) + (_flat_state(p, "exp_avg", m, True), _flat_state(p, "exp_avg_sq", v, True),
                                         _flat_state(p, "max_exp_avg_sq", vmax, bool(amsgrad)))

    return _foreach(params, make, check, _adam_run, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                    max_exp_avg_sqs=max_exp_avg_sqs)


def rmsprop_update_foreach(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None, *, lr=1e-2,
                           alpha=0.99, eps=1e-8, weight_decay=0.0, l1=0.0, momentum=0.0, centered=False):
    """:func:`rmsprop_update` on each parameter of a list with the same scalars (torch's
    ``foreach``); the lists as in :func:`sgd_update_foreach`."""
    def make(dt):
        return _rmsprop_hyper(dt, lr, alpha, eps, weight_decay, l1, momentum, centered)[0]

    def check(p, g, sq, gavg, buf):
        return _flat_param_grad(p, g) + (_flat_state(p, "square_avg", sq, True),
                                         _flat_state(p, "grad_avg", gavg, bool(centered)),
                                         _flat_state(p, "momentum_buffer", buf, momentum > 0.0))

    return _foreach(params, make, check, _rmsprop_run, grads=grads, square_avgs=square_avgs, grad_avgs=grad_avgs,
                    momentum_buffers=momentum_buffers)


def _warmup(dtype):
    """Compile (or load) the serial and parallel kernel of every update for ``dtype``."""
    for n in (1, PARALLEL_MIN_SIZE):
        p, g = np.zeros(n, dtype), np.zeros(n, dtype)
        s = [np.zeros(n, dtype) for _ in range(3)]
        sgd_update(p, g, s[0], lr=0.0, momentum=0.9)
        adam_update(p, g, s[0], s[1], s[2], step=1, lr=0.0, amsgrad=True)
        rmsprop_update(p, g, s[0], s[1], s[2], lr=0.0, momentum=0.9, centered=True)

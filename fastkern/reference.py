"""NumPy versions of the ops a training step needs, with the kernels' signatures and results.

They run while :mod:`fastkern.background` compiles the kernels, so that training
starts at once on an empty Numba cache; nothing here is compiled. Each takes the
same arguments as the kernel op of the same name and returns the same arrays
(pool indices included, so a forward from one tier and a backward from the
other agree), up to float rounding: sums run in NumPy's order, not the kernels'.
Validation is the kernels' own (``_check_conv`` and the ``_checks`` helpers).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ._checks import check_array, check_labels, check_same_dtype, check_shape
from .conv import _check_conv
from .linear import _check_linear
from .losses import _check_reduction, _reduce, _scale

__all__ = [
    "conv1d", "conv1d_backward", "conv2d", "conv2d_backward", "conv3d", "conv3d_backward",
    "linear", "linear_backward", "relu", "relu_backward", "bias_relu", "bias_relu_backward",
    "softmax_cross_entropy", "sgd_update", "adam_update", "rmsprop_update",
    "sgd_update_foreach", "adam_update_foreach", "rmsprop_update_foreach",
]


# ---------------------------------------------------------------- convolution


def _geometry(nd, x, weight, bias, stride, padding, dilation, groups, op):
    _, groups, kernel, (stride, lo, hi, dilation, out) = _check_conv(
        nd, x, weight, bias, stride, padding, dilation, groups, op)
    return groups, kernel, stride, lo, hi, dilation, out


def _tap_slices(kernel, stride, dilation, out):
    """For each kernel tap, the slice of the padded input it multiplies: (C, N, *out) views."""
    for tap in itertools.product(*map(range, kernel)):
        yield (slice(None), slice(None)) + tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out))


# Channels lead and the batch joins the positions, (G, C/G * taps, N * L), so that each
# group's product is one 2-D BLAS call rather than N small ones.


def _columns(x, groups, kernel, stride, lo, hi, dilation, out):
    """im2col: (G, C/G * taps, N * L) in the weight's (C/G, *kernel) order."""
    xp = np.pad(x.transpose(1, 0, *range(2, x.ndim)), [(0, 0), (0, 0)] + list(zip(lo, hi)))
    cols = np.stack([xp[s] for s in _tap_slices(kernel, stride, dilation, out)], axis=1)
    return cols.reshape(groups, -1, cols[0, 0].size)


def _channels_first(a):
    """(N, C, ...) -> contiguous (C, N * L)."""
    return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1], -1).transpose(1, 0, 2)).reshape(a.shape[1], -1)


def _pool2(y):
    """2x2 stride-2 max pool with flat (h * W + w) argmax indices, first maximum on ties."""
    n, c, h, w = y.shape
    ph, pw = h // 2, w // 2
    win = y[:, :, :2 * ph, :2 * pw].reshape(n, c, ph, 2, pw, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, ph, pw, 4)
    a = win.argmax(axis=-1)
    pooled = np.take_along_axis(win, a[..., None], axis=-1)[..., 0]
    rows = 2 * np.arange(ph)[:, None] + a // 2
    cols = 2 * np.arange(pw)[None, :] + a % 2
    return np.ascontiguousarray(pooled), (rows * w + cols).astype(np.int64)


def _conv(nd, x, weight, bias, stride, padding, dilation, groups, op, activation=None, max_pool=None):
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    if max_pool not in (None, 2) or isinstance(max_pool, bool) or (max_pool and nd != 2):
        raise ValueError(f"{op}: max_pool must be None or 2 (a 2x2 stride-2 max pool), got {max_pool!r}")
    g, kernel, stride, lo, hi, dilation, out = _geometry(nd, x, weight, bias, stride, padding, dilation,
                                                         groups, op)
    cols = _columns(x, g, kernel, stride, lo, hi, dilation, out)
    n, c_out = x.shape[0], weight.shape[0]
    y = np.matmul(weight.reshape(g, c_out // g, -1), cols).reshape(c_out, n, -1)
    y = np.ascontiguousarray(y.transpose(1, 0, 2)).reshape((n, c_out) + out)
    if bias is not None:
        y += bias.reshape((1, c_out) + (1,) * nd)
    if activation == "relu":
        np.maximum(y, 0, out=y)
    return _pool2(y) if max_pool else y


def _conv_backward(nd, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, op,
                   input_grad=True, activation=None, output=None, pool_indices=None):
    if (activation is None) != (output is None):
        raise ValueError(f"{op}: activation='relu' needs the forward's output, and output needs activation='relu'")
    g, kernel, stride, lo, hi, dilation, out = _geometry(nd, x, weight, None, stride, padding, dilation,
                                                         groups, op)
    check_same_dtype(grad_y=grad_y, x=x, weight=weight)
    n, c_in, c_out = x.shape[0], x.shape[1], weight.shape[0]
    pooled_shape = (n, c_out) + tuple(o // 2 for o in out)
    check_shape(grad_y, (n, c_out) + out if pool_indices is None else pooled_shape, "grad_y",
                "the forward's output" if pool_indices is None else "the 2x2 max pool of the output")
    if output is not None:
        grad_y = np.where(output > 0, grad_y, 0).astype(x.dtype)
    if pool_indices is not None:
        check_shape(pool_indices, pooled_shape, "pool_indices", "grad_y's shape")
        full = np.zeros((n, c_out, int(np.prod(out))), x.dtype)
        np.put_along_axis(full, pool_indices.reshape(n, c_out, -1), grad_y.reshape(n, c_out, -1), axis=2)
        grad_y = full.reshape((n, c_out) + out)
    gy = _channels_first(grad_y).reshape(g, c_out // g, -1)
    cols = _columns(x, g, kernel, stride, lo, hi, dilation, out)
    grad_w = np.matmul(gy, cols.transpose(0, 2, 1)).reshape(weight.shape)
    grad_b = gy.reshape(c_out, -1).sum(axis=1) if bias_grad else None
    grad_x = None
    if input_grad:
        dcols = np.matmul(weight.reshape(g, c_out // g, -1).transpose(0, 2, 1), gy)
        dcols = dcols.reshape((c_in, -1, n) + out)
        dxp = np.zeros((c_in, n) + tuple(s + a + b for s, a, b in zip(x.shape[2:], lo, hi)), x.dtype)
        for t, s in enumerate(_tap_slices(kernel, stride, dilation, out)):
            dxp[s] += dcols[:, t]
        inner = dxp[(slice(None), slice(None)) + tuple(slice(a, a + s) for a, s in zip(lo, x.shape[2:]))]
        grad_x = np.ascontiguousarray(inner.transpose(1, 0, *range(2, x.ndim)))
    return grad_x, grad_w, grad_b


def _conv_pair(nd):
    """conv{nd}d and its backward without the fused pool (which is 2-D only)."""
    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
        return _conv(nd, x, weight, bias, stride, padding, dilation, groups, f"conv{nd}d", activation)

    def conv_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                      input_grad=True, *, activation=None, output=None):
        return _conv_backward(nd, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                              f"conv{nd}d_backward", input_grad, activation, output)

    conv.__name__, conv_backward.__name__ = f"conv{nd}d", f"conv{nd}d_backward"
    conv.__doc__ = f"NumPy version of :func:`fastkern.conv{nd}d`."
    conv_backward.__doc__ = f"NumPy version of :func:`fastkern.conv{nd}d_backward`."
    return conv, conv_backward


conv1d, conv1d_backward = _conv_pair(1)
conv3d, conv3d_backward = _conv_pair(3)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None, max_pool=None):
    """NumPy version of :func:`fastkern.conv2d` (the fused max pool's indices included)."""
    return _conv(2, x, weight, bias, stride, padding, dilation, groups, "conv2d", activation, max_pool)


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True, *, activation=None, output=None, pool_indices=None):
    """NumPy version of :func:`fastkern.conv2d_backward`."""
    return _conv_backward(2, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv2d_backward", input_grad, activation, output, pool_indices)


# ---------------------------------------------------------------- linear and activations


def linear(x, weight, bias=None):
    """NumPy version of :func:`fastkern.linear`."""
    _check_linear(x, weight, bias)
    y = x @ weight.T
    if bias is not None:
        y += bias
    return np.ascontiguousarray(y)


def linear_backward(grad_y, x, weight, bias_grad=True):
    """NumPy version of :func:`fastkern.linear_backward`."""
    check_array(grad_y, "grad_y", 2)
    check_same_dtype(grad_y=grad_y, x=x, weight=weight)
    check_shape(grad_y, (x.shape[0], weight.shape[0]), "grad_y",
                f"(N, out_features) from x {x.shape} and weight {weight.shape}")
    return (np.ascontiguousarray(grad_y @ weight), np.ascontiguousarray(grad_y.T @ x),
            grad_y.sum(axis=0) if bias_grad else None)


def _into(out, value):
    if out is None:
        return np.ascontiguousarray(value)
    out[...] = value
    return out


def relu(x, out=None):
    """NumPy version of :func:`fastkern.relu`."""
    check_array(x, "x")
    return _into(out, np.maximum(x, 0))


def relu_backward(grad_y, x, out=None):
    """NumPy version of :func:`fastkern.relu_backward`."""
    check_same_dtype(grad_y=grad_y, x=x)
    return _into(out, np.where(x > 0, grad_y, 0).astype(x.dtype))


def bias_relu(x, bias, out=None):
    """NumPy version of :func:`fastkern.bias_relu`."""
    check_same_dtype(x=x, bias=bias)
    return _into(out, np.maximum(x + bias.reshape((1, -1) + (1,) * (x.ndim - 2)), 0))


def bias_relu_backward(grad_y, y, out=None):
    """NumPy version of :func:`fastkern.bias_relu_backward`."""
    check_same_dtype(grad_y=grad_y, y=y)
    gx = _into(out, np.where(y > 0, grad_y, 0).astype(y.dtype))
    return gx, gx.sum(axis=(0,) + tuple(range(2, y.ndim)))


# ---------------------------------------------------------------- loss and optimizer


def softmax_cross_entropy(logits, labels, reduction="mean"):
    """NumPy version of :func:`fastkern.softmax_cross_entropy`."""
    check_array(logits, "logits", 2)
    reduction = _check_reduction(reduction)
    n, c = logits.shape
    labels = check_labels(labels, n, c)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    losses = -logp[np.arange(n), labels]
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1
    return _reduce(losses, reduction, n, logits.dtype), (grad * _scale(reduction, n)).astype(logits.dtype)


def _param_grad(param, grad, weight_decay, l1):
    """The parameter as a plain array, and the gradient with its penalties (none: as it is)."""
    check_same_dtype(param=param, grad=grad)
    check_shape(grad, param.shape, "grad", "the parameter's shape")
    p = param.view(np.ndarray)
    return p, (grad + weight_decay * p + l1 * np.sign(p)) if weight_decay or l1 else grad


def sgd_update(param, grad, momentum_buffer=None, *, lr, momentum=0.0, dampening=0.0,
               nesterov=False, weight_decay=0.0, l1=0.0, first_step=False):
    """NumPy version of :func:`fastkern.sgd_update`."""
    p, d = _param_grad(param, grad, weight_decay, l1)
    if momentum:
        if momentum_buffer is None:
            raise ValueError("momentum > 0 needs a momentum_buffer")
        if first_step:
            momentum_buffer[...] = d
        else:
            momentum_buffer *= momentum
            momentum_buffer += (1 - dampening) * d
        d = d + momentum * momentum_buffer if nesterov else momentum_buffer
    p -= (lr * d).astype(p.dtype)
    return param


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=0.0,
                l1=0.0, amsgrad=False):
    """NumPy version of :func:`fastkern.adam_update`."""
    p, g = _param_grad(param, grad, weight_decay, l1)
    p *= p.dtype.type(1.0 - lr * decoupled_weight_decay)
    exp_avg += (1 - beta1) * (g - exp_avg)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    v = exp_avg_sq
    if amsgrad:
        v = np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps
    p -= (lr / (1.0 - beta1 ** step)) * (exp_avg / denom)
    return param


def rmsprop_update(param, grad, square_avg, grad_avg=None, momentum_buffer=None, *, lr=1e-2,
                   alpha=0.99, eps=1e-8, weight_decay=0.0, l1=0.0, momentum=0.0, centered=False):
    """NumPy version of :func:`fastkern.rmsprop_update`."""
    p, g = _param_grad(param, grad, weight_decay, l1)
    square_avg *= alpha
    square_avg += (1 - alpha) * g * g
    if centered:
        grad_avg += (1 - alpha) * (g - grad_avg)
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buffer *= momentum
        momentum_buffer += g / avg
        p -= lr * momentum_buffer
    else:
        p -= lr * (g / avg)
    return param


def _foreach(update, params, *lists, **scalars):
    """``update`` on each parameter in turn, its i-th array of every list (None: an unused state)."""
    lists = [[None] * len(params) if lst is None else lst for lst in lists]
    for i, p in enumerate(params):
        update(p, *(lst[i] for lst in lists), **scalars)
    return params


def sgd_update_foreach(params, grads, momentum_buffers=None, **scalars):
    """NumPy version of :func:`fastkern.sgd_update_foreach`."""
    return _foreach(sgd_update, params, grads, momentum_buffers, **scalars)


def adam_update_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, **scalars):
    """NumPy version of :func:`fastkern.adam_update_foreach`."""
    return _foreach(adam_update, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **scalars)


def rmsprop_update_foreach(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None, **scalars):
    """NumPy version of :func:`fastkern.rmsprop_update_foreach`."""
    return _foreach(rmsprop_update, params, grads, square_avgs, grad_avgs, momentum_buffers, **scalars)

"""Layers. Each forward calls one fastkern op and caches what its backward needs;
each backward calls the matching ``*_backward`` op, accumulates parameter
gradients into ``.grad`` and returns the gradient w.r.t. the input.

Parameters reach the kernels as plain arrays (``p.array``), the cached input is
the caller's array itself (no copy), and ``activation="relu"`` on Linear/Conv
fuses the bias add and the ReLU into one pass over the output: ``bias_relu``
after a Linear, the conv's own epilogue in a Conv (whose backward likewise
applies the ReLU's gradient as it reads grad_y). In a Sequential, a Conv2d followed
by a 2x2 stride-2 MaxPool2d runs as one op each way: the conv's epilogue takes the
window maxima, and its backward the pool's gradient and indices
(``MaxPool2d._forward_with`` / ``_backward_with``).
"""
from __future__ import annotations

import numpy as np

import fastkern as fk

from . import init
from .module import Module, Parameter, get_rng


def _acc(p, g):
    """p.grad += g (gradients accumulate until zero_grad); ``g`` is a backward op's fresh result."""
    if g is not None:
        p.accumulate_grad(g)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _spread_windows(pooled, shape):
    """``pooled`` (N, C, H//2, W//2) repeated over each 2x2 window of ``shape`` (zeros past the
    last whole window): where a max pool's gradient is not zero, the conv output it came from
    (the ReLU's mask, when the conv ran fused with the pool)."""
    out = np.zeros(shape, pooled.dtype)
    ph, pw = pooled.shape[2:]
    out[:, :, :2 * ph, :2 * pw] = pooled.repeat(2, axis=2).repeat(2, axis=3)
    return out


class _WithActivation(Module):
    """Shared by Linear/Conv: the bias add, optionally fused with a ReLU."""

    def _init_params(self, wshape, bias, activation, dtype, seed):
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        self.weight = Parameter(np.empty(wshape, dtype))
        self.bias = Parameter(np.empty(wshape[0], dtype)) if bias else None
        init.torch_default_(self.weight.array, None if self.bias is None else self.bias.array,
                            rng=get_rng(seed))

    def _finish(self, y):
        """Add the bias (and ReLU) in place when the op did not."""
        if self.activation == "relu":
            if self.bias is None:
                fk.relu(y, out=y)
            else:
                fk.bias_relu(y, self.bias.array, out=y)
            self._y = y
        return y

    def _start_backward(self, g):
        """Through the fused ReLU (and bias): the gradient w.r.t. the op's output."""
        if self.activation != "relu":
            return g
        y, self._y = self._y, None
        if self.bias is None:
            return fk.relu_backward(g, y)
        g, gb = fk.bias_relu_backward(g, y)
        _acc(self.bias, gb)
        return g

    def _op_bias(self):
        """The bias the op itself should add (None when the fused epilogue adds it)."""
        return None if self.bias is None or self.activation else self.bias.array


class Linear(_WithActivation):
    """``y = x @ W.T + b`` for x of shape (N, in_features); W is (out, in)."""

    def __init__(self, in_features, out_features, bias=True, activation=None, dtype=np.float32,
                 seed=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_params((out_features, in_features), bias, activation, dtype, seed)

    def forward(self, x):
        self._x = x
        return self._finish(fk.linear(x, self.weight.array, self._op_bias()))

    def backward(self, g):
        g = self._start_backward(g)
        gx, gw, gb = fk.linear_backward(g, self._x, self.weight.array,
                                        bias_grad=self._op_bias() is not None)
        _acc(self.weight, gw)
        if self._op_bias() is not None:
            _acc(self.bias, gb)
        self._x = None
        return gx

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class _ConvNd(_WithActivation):
    nd = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, activation=None, dtype=np.float32, seed=None, input_grad=True):
        super().__init__()
        # input_grad=False: backward skips the gradient w.r.t. the input and returns None,
        # for a first layer whose input is data (what torch does when x needs no grad)
        self.input_grad = bool(input_grad)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        k = _tuple(kernel_size, self.nd)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self._init_params((out_channels, in_channels // groups) + k, bias, activation, dtype, seed)
        self._pooled = None  # the output of a max pool run fused with this conv (Conv2d)

    def forward(self, x):
        self._x, self._pooled = x, None
        if self.activation == "relu":  # bias and ReLU in the conv's own pass over its output
            b = None if self.bias is None else self.bias.array
            self._y = self._op(x, self.weight.array, b, "relu")
            return self._y
        return self._op(x, self.weight.array, self._op_bias())

    def backward(self, g):
        # a fused ReLU's gradient is applied by the conv backward as it reads g: no pass of its own
        y, self._y = (self._y, None) if self.activation == "relu" else (None, None)
        if y is None and self.activation == "relu":  # the forward ran fused with a max pool
            y = _spread_windows(self._pooled, g.shape)
        self._pooled = None
        return self._accumulate(self._op_backward(g, self._x, self.weight.array, self.bias is not None,
                                                  self.input_grad, self.activation, y))

    def _accumulate(self, grads):
        gx, gw, gb = grads
        _acc(self.weight, gw)
        if self.bias is not None:
            _acc(self.bias, gb)
        self._x = None
        return gx

    def extra_repr(self):
        args = ", ".join(f"{k}={v}" for k, v in self.conv_args.items())
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {args}"


class Conv1d(_ConvNd):
    """1-D convolution over (N, C, L) (torch.nn.Conv1d arguments)."""
    nd = 1

    def _op(self, x, w, b, activation=None):
        return fk.conv1d(x, w, b, activation=activation, **self.conv_args)

    def _op_backward(self, g, x, w, bias_grad, input_grad, activation=None, output=None):
        return fk.conv1d_backward(g, x, w, bias_grad=bias_grad, input_grad=input_grad, activation=activation,
                                  output=output, **self.conv_args)


class Conv2d(_ConvNd):
    """2-D convolution over (N, C, H, W) (torch.nn.Conv2d arguments)."""
    nd = 2

    def _op(self, x, w, b, activation=None):
        return fk.conv2d(x, w, b, activation=activation, **self.conv_args)

    def _op_backward(self, g, x, w, bias_grad, input_grad, activation=None, output=None):
        return fk.conv2d_backward(g, x, w, bias_grad=bias_grad, input_grad=input_grad, activation=activation,
                                  output=output, **self.conv_args)

    def _forward_pooled(self, x):
        """This conv (and its ReLU) with the 2x2 max pool after it as one op: (pooled, indices)."""
        self._x, self._y = x, None
        b = None if self.bias is None else self.bias.array
        pooled, idx = fk.conv2d(x, self.weight.array, b, activation=self.activation, max_pool=2, **self.conv_args)
        self._pooled = pooled
        return pooled, idx

    def _output_shape(self, input_shape):
        """The shape of this layer's output for an input of ``input_shape`` (N, C, H, W)."""
        n, _, *sizes = input_shape
        a = self.conv_args
        if a["padding"] == "same":
            return (n, self.out_channels, *sizes)
        pad = (0, 0) if a["padding"] == "valid" else _tuple(a["padding"], 2)
        return (n, self.out_channels) + tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(sizes, pad, _tuple(a["dilation"], 2), self.kernel_size, _tuple(a["stride"], 2)))

    def _backward_pooled(self, g, indices, pooled):
        """Backward through this conv and the 2x2 max pool after it (gradient and output of the
        pool, its indices), as one op: no full-size gradient of this layer's output."""
        relu = self.activation == "relu"
        self._y = self._pooled = None
        return self._accumulate(fk.conv2d_backward(
            g, self._x, self.weight.array, bias_grad=self.bias is not None, input_grad=self.input_grad,
            activation=self.activation, output=pooled if relu else None, pool_indices=indices, **self.conv_args))


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        super().__init__()
        self.args = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
        # the conv backward can route this pool's gradient itself (Sequential pairs them)
        self._fusable = (_tuple(kernel_size, 2) == (2, 2) and stride in (None, 2, (2, 2))
                         and _tuple(padding, 2) == (0, 0) and _tuple(dilation, 2) == (1, 1))

    def forward(self, x):
        y, self._idx = fk.max_pool2d(x, return_indices=True, **self.args)
        self._shape = x.shape
        self._y = y
        return y

    def backward(self, g):
        gx = fk.max_pool2d_backward(g, self._idx, self._shape, **self.args)
        self._idx = self._y = None
        return gx

    def _forward_with(self, before, x):
        # only the plain classes: a subclass's own forward or backward must run
        if not (self._fusable and type(self) is MaxPool2d and type(before) is Conv2d):
            return NotImplemented
        y, self._idx = before._forward_pooled(x)
        self._shape = before._output_shape(x.shape)
        self._y = y
        return y

    def _backward_with(self, before, g):
        if not (self._fusable and type(self) is MaxPool2d and type(before) is Conv2d and self._idx is not None
                and getattr(before, "_x", None) is not None):
            return NotImplemented
        gx = before._backward_pooled(g, self._idx, self._y)
        self._idx = self._y = None
        return gx

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.args.items())


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__()
        self.args = dict(kernel_size=kernel_size, stride=stride, padding=padding,
                         count_include_pad=count_include_pad)

    def forward(self, x):
        self._shape = x.shape
        return fk.avg_pool2d(x, **self.args)

    def backward(self, g):
        return fk.avg_pool2d_backward(g, self._shape, **self.args)

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.args.items())


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): the mean over each channel's plane."""

    def forward(self, x):
        self._shape = x.shape
        return fk.global_avg_pool2d(x)

    def backward(self, g):
        return fk.global_avg_pool2d_backward(g, self._shape)


class Flatten(Module):
    """(N, *) -> (N, prod(*)); a view when the input is contiguous."""

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, g):
        return g.reshape(self._shape)


class ReLU(Module):
    """``max(x, 0)``. With ``inplace=True`` the input array is overwritten (saves a pass of memory)."""

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        y = fk.relu(x, out=x if self.inplace else None)
        self._y = y  # y > 0 exactly where x > 0, so y serves the backward
        return y

    def backward(self, g):
        gx = fk.relu_backward(g, self._y)
        self._y = None
        return gx


class LeakyReLU(Module):
    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        self._x = x
        return fk.leaky_relu(x, self.negative_slope)

    def backward(self, g):
        gx = fk.leaky_relu_backward(g, self._x, self.negative_slope)
        self._x = None
        return gx


class Sigmoid(Module):
    def forward(self, x):
        self._y = fk.sigmoid(x)
        return self._y

    def backward(self, g):
        return fk.sigmoid_backward(g, self._y)


class Tanh(Module):
    def forward(self, x):
        self._y = fk.tanh(x)
        return self._y

    def backward(self, g):
        return fk.tanh_backward(g, self._y)


class _BatchNorm(Module):
    ndims = (2,)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype))
        self.bias = Parameter(np.zeros(num_features, dtype))
        self.register_buffer("running_mean", np.zeros(num_features, dtype))
        self.register_buffer("running_var", np.ones(num_features, dtype))
        self.register_buffer("num_batches_tracked", np.zeros((), np.int64))

    def forward(self, x):
        if x.ndim not in self.ndims:
            raise ValueError(f"{type(self).__name__} expects {self.ndims}-D input, got shape {x.shape}")
        y, self._mean, self._invstd = fk.batch_norm(
            x, self.weight.array, self.bias.array, self.running_mean, self.running_var,
            self.training, momentum=self.momentum, eps=self.eps, return_stats=True)
        if self.training:
            self.num_batches_tracked += 1
        self._x, self._fwd_training = x, self.training
        return y

    def backward(self, g):
        gx, gw, gb = fk.batch_norm_backward(g, self._x, self.weight.array, self._mean,
                                            self._invstd, training=self._fwd_training)
        _acc(self.weight, gw)
        _acc(self.bias, gb)
        self._x = None
        return gx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L), per channel."""
    ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W), per channel."""
    ndims = (4,)


class Dropout(Module):
    """Zero each element with probability ``p`` in training, scale the rest by 1/(1-p).

    Each forward draws the kernel's seed from the layer's own generator
    (seeded from ``seed`` or the global one); ``models.reseed_dropout`` derives
    them from a key instead, e.g. (seed, epoch, step), for reproducible resumes.
    """

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.generator = np.random.default_rng(get_rng(seed).integers(2**63))

    def forward(self, x):
        self._mask = None
        if not self.training or self.p == 0.0:
            return x
        y, self._mask = fk.dropout(x, self.p, int(self.generator.integers(2**63)), training=True)
        return y

    def backward(self, g):
        if self._mask is None:
            return g
        gx = fk.dropout_backward(g, self._mask, self.p)
        self._mask = None
        return gx

    def extra_repr(self):
        return f"p={self.p}"


def reseed_dropout(model: Module, *key: int) -> None:
    """Give every Dropout in ``model`` a generator derived from ``key`` and its position."""
    for i, m in enumerate(m for m in model.modules() if isinstance(m, Dropout)):
        m.generator = np.random.default_rng([*key, i])

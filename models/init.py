"""Parameter initializers (torch.nn.init semantics), in place, seeded.

Each takes an array and an optional ``rng`` (a ``numpy.random.Generator``;
default: the global one that ``models.manual_seed`` seeds) and fills the
array in place.
"""
from __future__ import annotations

import math


from .module import get_rng


def _fans(shape):
    """torch's fan computation: (out, in, *kernel) -> fan_in = in*k, fan_out = out*k."""
    if len(shape) < 2:
        raise ValueError(f"fan in/out need an array of >= 2 dims, got shape {tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param=None) -> float:
    if nonlinearity in ("linear", "conv1d", "conv2d", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def _fill(arr, values):
    arr[...] = values.astype(arr.dtype, copy=False)
    return arr


def uniform_(arr, low=0.0, high=1.0, rng=None):
    return _fill(arr, (get_rng() if rng is None else rng).uniform(low, high, arr.shape))


def normal_(arr, mean=0.0, std=1.0, rng=None):
    return _fill(arr, (get_rng() if rng is None else rng).normal(mean, std, arr.shape))


def zeros_(arr):
    arr[...] = 0
    return arr


def ones_(arr):
    arr[...] = 1
    return arr


def kaiming_uniform_(arr, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """He init: U(-b, b) with b = gain * sqrt(3 / fan)."""
    fan_in, fan_out = _fans(arr.shape)
    fan = fan_in if mode == "fan_in" else fan_out
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return uniform_(arr, -bound, bound, rng)


def kaiming_normal_(arr, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """He init: N(0, std^2) with std = gain / sqrt(fan)."""
    fan_in, fan_out = _fans(arr.shape)
    fan = fan_in if mode == "fan_in" else fan_out
    return normal_(arr, 0.0, calculate_gain(nonlinearity, a) / math.sqrt(fan), rng)


def xavier_uniform_(arr, gain=1.0, rng=None):
    """Glorot init: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(arr.shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(arr, -bound, bound, rng)


def xavier_normal_(arr, gain=1.0, rng=None):
    """Glorot init: N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(arr.shape)
    return normal_(arr, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng)


def torch_default_(weight, bias=None, rng=None):
    """torch's Linear/Conv default: kaiming_uniform(a=sqrt(5)) weight, U(+-1/sqrt(fan_in)) bias."""
    kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
    if bias is not None:
        fan_in, _ = _fans(weight.shape)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound, rng)
    return weight

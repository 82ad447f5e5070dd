"""Argument validation at the Python boundary.

Numba does not bounds-check, so a wrong shape that reaches a kernel corrupts
memory silently. Every public op validates here, once, before any kernel runs;
kernels themselves never re-check.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(x, name: str, ndim=None) -> np.ndarray:
    """Return ``x`` if it is a float32/float64 ndarray (of ``ndim`` dims, an int or a tuple)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must be {want}-D, got {x.ndim}-D array of shape {x.shape}")
    return x


def check_same_dtype(**arrays) -> np.dtype:
    """All non-None arrays share one float dtype; return it. Names the dtypes otherwise."""
    present = {k: v for k, v in arrays.items() if v is not None}
    dtypes = {k: v.dtype for k, v in present.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}: {d}" for k, d in dtypes.items())
        raise TypeError(f"mixed dtypes are not supported ({listing}); cast them to one float dtype")
    return next(iter(dtypes.values()))


def check_out(out, shape, dtype, name: str = "out") -> np.ndarray:
    """``out`` must be a C-contiguous ndarray of exactly ``shape`` and ``dtype``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def check_no_overlap(out: np.ndarray, **inputs) -> None:
    """Raise if ``out`` shares memory with any input (kernels read and write in parallel)."""
    own = out.flags.owndata  # two arrays that each own their memory cannot overlap: 0.3 us cheaper
    for k, v in inputs.items():  # the bounds test first: the exact one can take long
        if v is None or (own and v is not out and v.flags.owndata):
            continue
        if np.may_share_memory(out, v) and np.shares_memory(out, v):
            raise ValueError(f"out overlaps input {k}; pass a separate output array")


def as_tuple(value, n: int, name: str) -> tuple:
    """An int or a length-``n`` sequence of ints, as in torch's ``_pair``/``_triple``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        return tuple(int(v) for v in value)
    raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")


def check_positive(values: tuple, name: str) -> tuple:
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be > 0, got {values}")
    return values


def check_non_negative(values: tuple, name: str) -> tuple:
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {values}")
    return values


def check_scalar(value, name: str) -> float:
    if type(value) is float and math.isfinite(value):  # the usual case, without the ABC test
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):  # math, not numpy: a ufunc call costs a microsecond per op
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_labels(labels, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    """Integer class labels of shape (n,) in [0, num_classes); returned as contiguous int64."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(labels).__name__}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return np.ascontiguousarray(labels, dtype=np.int64)


def check_shape(x: np.ndarray, shape, name: str, expected_from: str = "") -> np.ndarray:
    """``x`` has exactly ``shape``; ``expected_from`` says where that shape comes from."""
    if x.shape != tuple(shape):
        why = f" ({expected_from})" if expected_from else ""
        raise ValueError(f"{name} has shape {x.shape}, expected {tuple(shape)}{why}")
    return x


def check_vector(v, name: str, n: int, what: str = "") -> np.ndarray:
    """A float 1-D array of length ``n`` (per-channel / per-feature parameters)."""
    check_array(v, name, 1)
    if v.shape[0] != n:
        why = f" ({what})" if what else ""
        raise ValueError(f"{name} must have length {n}{why}, got shape {v.shape}")
    return v


def check_writeable(x: np.ndarray, name: str) -> np.ndarray:
    """Arrays a kernel updates in place must be writeable."""
    if not x.flags.writeable:
        raise ValueError(f"{name} is read-only but is updated in place")
    return x


def plain(v) -> bool:
    """Whether ``v`` is None, an exact int or str, or a tuple of exact ints.

    Such values are equal only when they validate identically (``True == 1``
    and ``1.0 == 1`` are not plain), so they can key a cache of checked results.
    """
    t = type(v)
    return v is None or t is int or t is str or (t is tuple and all(type(e) is int for e in v))


def memoize_plain(fn, maxsize: int = 512):
    """Cache a pure checking function for calls whose arguments are all :func:`plain`.

    Training calls every op with the same shapes and arguments at every step;
    other calls (and calls that raise) always run ``fn``.
    """
    cache: dict = {}

    @functools.wraps(fn)
    def cached(*args):
        if not all(plain(a) for a in args):
            return fn(*args)
        hit = cache.get(args)
        return remember(cache, args, fn(*args), maxsize) if hit is None else hit

    return cached


def remember(cache: dict, key, value, maxsize: int = 512):
    """``cache[key] = value`` (unless ``key`` is None), emptying a full cache first; returns ``value``."""
    if key is not None:
        if len(cache) >= maxsize:
            cache.clear()
        cache[key] = value
    return value

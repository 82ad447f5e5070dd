"""Training from the first second: the kernels compile in child processes meanwhile.

With an empty Numba cache, compiling the kernels of one LeNet-5 training step
takes about 40 s (LLVM on some thirty large functions), and the first step waits
for all of it. Instead, ``models`` runs the first step on the NumPy versions of
:mod:`fastkern.reference` (same arguments, same results up to rounding) while it
records each op's call: its name and its arguments' shapes, dtypes and strides.
At the end of that step (the optimizer's ``step()``, or else the model's third forward)
two child Pythons replay the recorded calls on zero-filled arrays of the same
types, the conv calls in one and the rest in the other. That compiles exactly the
kernels the step needs into the same on-disk cache this process reads. The NumPy
versions stand in until both children exit; the first call after that loads the
kernels from the cache in well under a second.

Nothing of this happens when the cache already holds the conv and GEMM drivers for the
dtype, or with ``FASTKERN_BACKGROUND_COMPILE=0``; plain ``fastkern`` calls never
start it. A child still compiling when this process exits finishes its work, so
the next run starts warm. Each child is its own session, so the scheduler gives
it a share of the cores beside the training process rather than what is left.

Numba rewrites a function's cache index without a lock: two processes saving
different signatures of one kernel at once could leave an entry naming the other's
code. Importing fastkern therefore wraps Numba's cache save in an exclusive
``flock`` on one file per cache directory (where ``fcntl`` is missing, one child
compiles everything).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

_recording = None  # the calls of the first step, while it runs on the NumPy versions
_children = []  # the compiling child processes, until all have exited
_on_numpy = 0  # depth of on_numpy() blocks


def _lock_cache_saves():
    """Make each Numba cache save (index read, entry added, index and data written) atomic
    between processes."""
    from numba.core import caching
    save = caching.IndexDataCacheFile.save
    if fcntl is None or getattr(save, "fastkern_locked", False):
        return

    def locked_save(self, key, data):
        with _flock(os.path.join(self._cache_path, ".fastkern-save.lock")):
            save(self, key, data)

    locked_save.fastkern_locked = True
    caching.IndexDataCacheFile.save = locked_save


@contextlib.contextmanager
def _flock(path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def enabled() -> bool:
    """False when ``FASTKERN_BACKGROUND_COMPILE=0`` turns the background compile off."""
    return os.environ.get("FASTKERN_BACKGROUND_COMPILE", "1") != "0"


def kernels_cached(dtype) -> bool:
    """Whether the Numba cache holds the conv and GEMM drivers (the slowest to compile) for
    ``dtype``: a model of convolutions or of linear layers alone then starts warm.

    True too when there is no cache to share (caching off), since a child's
    compile would then be lost.
    """
    from . import conv, gemm
    name = np.dtype(dtype).name
    for kernel in (conv._forward_kernel, conv._backward_kernel, gemm._gemm_flat_parallel):
        cache_file = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
        if cache_file is None:
            return True
        try:
            index = cache_file._load_index()
        except Exception:  # an unreadable index: Numba recompiles and rewrites it
            return False
        if not any(name in str(key[0]) for key in index):
            return False
    return True


def start_recording(dtype) -> bool:
    """Run the ops of :mod:`fastkern.reference` on NumPy and record their calls, if the
    kernels for ``dtype`` still have to be compiled. True if recording started."""
    global _recording
    if _recording is not None or _children or not enabled() or kernels_cached(dtype):
        return False
    _recording = []
    return True


def recording() -> bool:
    """True while the first step's calls are being recorded."""
    return _recording is not None


def compile_recorded() -> bool:
    """Start the children that compile what the recorded calls need; True if any started."""
    global _recording
    if not _recording:
        _recording = None
        return False
    unique = {}
    for call in _recording:  # once per signature; an argument JSON cannot hold compiles here later
        with contextlib.suppress(TypeError, ValueError):
            unique.setdefault(json.dumps(call), call)
    calls, _recording = list(unique.values()), None
    conv = [c for c in calls if c[0].startswith("conv")]
    parts = [conv, [c for c in calls if not c[0].startswith("conv")]] if fcntl is not None else [calls]
    for part in parts:
        if part:
            child = subprocess.Popen([sys.executable, "-c", "from fastkern import background; background._replay()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            with child.stdin:
                child.stdin.write(json.dumps(part).encode())
            _children.append(child)
    return bool(_children)


def compiling() -> bool:
    """True while the NumPy versions stand in: recording, or children still compiling."""
    if _recording is not None:
        return True
    _children[:] = [c for c in _children if c.poll() is None]
    return bool(_children)


def wait(timeout=None) -> None:
    """Block until the background compile (if any) has finished."""
    for child in _children:
        child.wait(timeout)
    _children.clear()


@contextlib.contextmanager
def on_numpy():
    """Run the ops of :mod:`fastkern.reference` on NumPy inside the block, as while the
    kernels compile (to time or test that path)."""
    global _on_numpy
    _on_numpy += 1
    try:
        yield
    finally:
        _on_numpy -= 1


def tiered(name, kernel_op, numpy_op):
    """``kernel_op``, except that ``numpy_op`` runs (and is recorded) while the kernels compile."""
    @functools.wraps(kernel_op)
    def op(*args, **kwargs):
        if _recording is None and not _children:
            return numpy_op(*args, **kwargs) if _on_numpy else kernel_op(*args, **kwargs)
        if _recording is not None:
            _recording.append((name, [_spec(a) for a in args], {k: _spec(v) for k, v in kwargs.items()}))
        elif not compiling():
            return kernel_op(*args, **kwargs)
        return numpy_op(*args, **kwargs)
    return op


# ---------------------------------------------------------------- a call as JSON, and its replay


def _spec(value):
    """A JSON stand-in for an argument: arrays by type, shape and strides; tuples and lists
    (the foreach updates' arrays) element by element."""
    if isinstance(value, np.ndarray):
        return {"array": value.dtype.str, "shape": value.shape, "strides": value.strides}
    if isinstance(value, tuple):
        return {"tuple": [_spec(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_spec(v) for v in value]}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _value(spec):
    if not isinstance(spec, dict):
        return spec
    if "tuple" in spec:
        return tuple(_value(v) for v in spec["tuple"])
    if "list" in spec:
        return [_value(v) for v in spec["list"]]
    dtype, shape, strides = np.dtype(spec["array"]), tuple(spec["shape"]), tuple(spec["strides"])
    if any(s < 0 for s in strides) or 0 in shape:
        return np.zeros(shape, dtype)
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) // dtype.itemsize + 1
    return np.lib.stride_tricks.as_strided(np.zeros(extent, dtype), shape, strides)


def _window_corners(op, args, kwargs):
    """Pool indices that pass the kernel's check (each window's top-left element), so that
    a replayed conv backward runs to its end and compiles all it calls."""
    import inspect

    from .conv import _check_conv
    bound = inspect.signature(op).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    _, _, _, (_, _, _, _, out) = _check_conv(2, a["x"], a["weight"], None, a["stride"], a["padding"],
                                              a["dilation"], a["groups"], "conv2d_backward")
    n, c, ph, pw = a["pool_indices"].shape
    corners = 2 * np.arange(ph)[:, None] * out[1] + 2 * np.arange(pw)[None, :]
    return np.ascontiguousarray(np.broadcast_to(corners, (n, c, ph, pw)), np.int64)


def _replay():
    """A child's work: each recorded call once, on zeros of the recorded types."""
    import fastkern
    for name, args, kwargs in json.loads(sys.stdin.read()):
        op = getattr(fastkern, name)
        args, kwargs = list(map(_value, args)), {k: _value(v) for k, v in kwargs.items()}
        try:
            if kwargs.get("pool_indices") is not None:
                kwargs["pool_indices"] = _window_corners(op, args, kwargs)
            op(*args, **kwargs)
        except (ValueError, TypeError, ZeroDivisionError):  # a call that fails on zeros has
            pass  # compiled what it reached; the rest compiles where it is first called

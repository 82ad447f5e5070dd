"""Convolutions (1-D, 2-D, 3-D) by im2col + GEMM, forward and backward side by side.

One 3-D implementation serves all three ops (1-D/2-D inputs are views with
leading spatial dims of size 1). Work is split over threads by sample: each
thread im2col's one sample (or one tile of output rows of it) into its own
slice of a cached workspace, while it is hot in L2, and multiplies it with the
single-threaded ``gemm_serial``. So there is no threading inside the GEMM, and
nothing is shared between threads except read-only inputs:

* forward:        ``y[n, g] = W[g] @ col[g]``            (bias pre-filled, beta=1)
* grad weight:    ``dW_t[g] += dy[n, g] @ col[g].T``       per-thread partials, summed at the end
* grad input:     ``col[g] = W[g].T @ dy[n, g]``, then col2im into ``dx[n]`` (the thread owns sample n)

Both backward products run in one pass over the samples, so the columns are
built once per backward. Groups are a loop inside the kernel over row blocks
of the same columns.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._checks import check_array, check_same_dtype
from .gemm import gemm_serial
from .im2col import gather_rows, lift3, make_geo, scatter_rows, spatial_params

# Column workspace, all threads together. Each thread's tile (columns of one
# sample, or a band of its output rows, plus one output tile) aims at
# _TILE_BYTES so it stays in the 2 MiB L2 between im2col and the GEMM that
# consumes it; _MAX_WORKSPACE_BYTES is the hard cap for the total (a tile is
# never smaller than one output row, so a single row larger than the cap is the
# only way past it).
_TILE_BYTES = 1 << 20
_MAX_WORKSPACE_BYTES = 64 << 20

_workspaces: dict = {}
_peak_bytes = 0


def workspace_bytes() -> int:
    """Bytes currently held by the cached conv workspaces."""
    return sum(w.nbytes for w in _workspaces.values())


def peak_workspace_bytes() -> int:
    """Largest total the conv workspaces have reached in this process."""
    return _peak_bytes


def clear_workspaces() -> None:
    """Release the cached workspaces (they are re-created on the next call)."""
    _workspaces.clear()


def _workspace(dtype, n_threads, per_thread):
    global _peak_bytes
    key = np.dtype(dtype)
    ws = _workspaces.get(key)
    if ws is None or ws.shape[0] != n_threads or ws.shape[1] < per_thread:
        old = 0 if ws is None or ws.shape[0] != n_threads else ws.shape[1]
        _workspaces.pop(key, None)
        ws = np.empty((n_threads, max(per_thread, old)), dtype=key)
        _workspaces[key] = ws
        _peak_bytes = max(_peak_bytes, workspace_bytes())
    return ws


def _tiling(k_rows, m_rows, rows, ow, itemsize, n_threads, min_tiles=1):
    """Output rows per tile so one thread's columns + output tile fit _TILE_BYTES (and the cap)."""
    per_row = (k_rows + m_rows) * ow * itemsize
    budget = min(_TILE_BYTES, _MAX_WORKSPACE_BYTES // n_threads)
    rt = max(1, min(rows, budget // per_row))
    if rows <= rt * 2 and per_row * rows * n_threads <= _MAX_WORKSPACE_BYTES:
        rt = rows  # a whole sample is cheaper than two half tiles and an output copy
    n_tiles = -(-rows // rt)
    if n_tiles < min_tiles:
        n_tiles = min(rows, min_tiles)
        rt = -(-rows // n_tiles)
        n_tiles = -(-rows // rt)
    return rt, n_tiles


# ---------------------------------------------------------------------------
# Kernels


@njit(parallel=True, cache=True)
def _forward_kernel(x, w, bias, has_bias, y, ws, geo, rt, n_tiles, n_threads):
    # x (N, C, D, H, W); w (G, Mg, Kg); y (N, G, Mg, P); ws (T, >= K*pt + Mg*pt)
    n_samples, n_chan = x.shape[0], x.shape[1]
    n_groups, mg, kg = w.shape
    ow = geo[14]
    rows = geo[12] * geo[13]
    p_all = rows * ow
    k = n_groups * kg
    one = y.dtype.type(1)
    zero = y.dtype.type(0)
    n_items = n_samples * n_tiles
    for t in prange(n_threads):
        buf = ws[t]
        for it in range(t * n_items // n_threads, (t + 1) * n_items // n_threads):
            n = it // n_tiles
            r0 = (it - n * n_tiles) * rt
            r1 = min(r0 + rt, rows)
            pt = (r1 - r0) * ow
            col = buf[: k * pt].reshape((k, pt))
            gather_rows(x[n], col, 0, n_chan, r0, r1, geo)
            whole = pt == p_all
            for g in range(n_groups):
                out = y[n, g] if whole else buf[k * pt : k * pt + mg * pt].reshape((mg, pt))
                for m in range(mg):
                    b = bias[g * mg + m] if has_bias else zero
                    for p in range(pt):
                        out[m, p] = b
                gemm_serial(w[g], col[g * kg : (g + 1) * kg], out, one, one)
                if not whole:
                    for m in range(mg):
                        for p in range(pt):
                            y[n, g, m, r0 * ow + p] = out[m, p]


@njit(parallel=True, cache=True)
def _backward_kernel(gy, x, w, dx, dw_part, db_part, ws, geo, rt, n_tiles, n_threads):
    # gy (N, G, Mg, P); dx like x, written here; dw_part (T, G, Mg, Kg), db_part (T, G*Mg) zeroed.
    n_samples, n_chan = x.shape[0], x.shape[1]
    n_groups, mg, kg = w.shape
    ow = geo[14]
    rows = geo[12] * geo[13]
    p_all = rows * ow
    k = n_groups * kg
    one = gy.dtype.type(1)
    zero = gy.dtype.type(0)
    for t in prange(n_threads):
        buf = ws[t]
        for n in range(t * n_samples // n_threads, (t + 1) * n_samples // n_threads):
            dx[n] = 0
            for tile in range(n_tiles):
                r0 = tile * rt
                r1 = min(r0 + rt, rows)
                pt = (r1 - r0) * ow
                col = buf[: k * pt].reshape((k, pt))
                gather_rows(x[n], col, 0, n_chan, r0, r1, geo)
                whole = pt == p_all
                for g in range(n_groups):
                    gyg = gy[n, g] if whole else buf[k * pt : k * pt + mg * pt].reshape((mg, pt))
                    if not whole:
                        for m in range(mg):
                            for p in range(pt):
                                gyg[m, p] = gy[n, g, m, r0 * ow + p]
                    for m in range(mg):
                        s = zero
                        for p in range(pt):
                            s += gyg[m, p]
                        db_part[t, g * mg + m] += s
                    colg = col[g * kg : (g + 1) * kg]
                    gemm_serial(gyg, colg.T, dw_part[t, g], one, one)
                    colg[:, :] = zero
                    gemm_serial(w[g].T, gyg, colg, one, one)
                scatter_rows(dx[n], col, 0, n_chan, r0, r1, geo)


# ---------------------------------------------------------------------------
# Validation and the N-d implementation


def _check_conv(nd, x, weight, bias, stride, padding, dilation, groups, op):
    check_array(x, "x", nd + 2)
    check_array(weight, "weight", nd + 2)
    if bias is not None:
        check_array(bias, "bias", 1)
    dtype = check_same_dtype(x=x, weight=weight, bias=bias)
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups <= 0:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    n, c_in = x.shape[:2]
    c_out, c_in_g = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    if c_in_g == 0 or any(k == 0 for k in kernel):
        raise ValueError(f"{op}: weight of shape {weight.shape} is empty")
    if c_out % groups:
        raise ValueError(
            f"{op}: out channels {c_out} (weight.shape={weight.shape}) not divisible by groups={groups}"
        )
    if c_in != c_in_g * groups:
        raise ValueError(
            f"{op}: x has {c_in} channels (x.shape={x.shape}) but weight.shape={weight.shape} with "
            f"groups={groups} expects {c_in_g} * {groups} = {c_in_g * groups}"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},), got {bias.shape}")
    geo_args = spatial_params(nd, kernel, stride, padding, dilation, x.shape[2:], allow_same=True)
    return dtype, groups, kernel, geo_args


def _prepare(nd, x, weight, stride, padding, dilation, groups, kernel, geo_args):
    stride, pad_lo, _, dilation, out = geo_args
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    x5 = np.ascontiguousarray(x).reshape((n, c_in) + lift3(x.shape[2:], 1))
    w3 = np.ascontiguousarray(weight).reshape((groups, c_out // groups, -1))
    geo = make_geo(lift3(kernel, 1), lift3(stride, 1), lift3(pad_lo, 0), lift3(dilation, 1), lift3(out, 1))
    return x5, w3, geo, out


def _conv_forward(nd, x, weight, bias, stride, padding, dilation, groups, op):
    dtype, groups, kernel, geo_args = _check_conv(nd, x, weight, bias, stride, padding, dilation, groups, op)
    x5, w3, geo, out = _prepare(nd, x, weight, stride, padding, dilation, groups, kernel, geo_args)
    n, c_out = x.shape[0], weight.shape[0]
    y = np.empty((n, c_out) + out, dtype=dtype)
    if y.size == 0:
        return y
    n_groups, mg, kg = w3.shape
    rows, ow = geo[12] * geo[13], geo[14]
    n_threads = numba.get_num_threads()
    rt, n_tiles = _tiling(n_groups * kg, mg, rows, ow, dtype.itemsize, n_threads,
                          min_tiles=-(-n_threads // n))
    ws = _workspace(dtype, n_threads, (n_groups * kg + mg) * rt * ow)
    has_bias = bias is not None
    b = np.ascontiguousarray(bias) if has_bias else np.zeros(1, dtype)
    _forward_kernel(x5, w3, b, has_bias, y.reshape((n, n_groups, mg, -1)), ws, geo, rt, n_tiles, n_threads)
    return y


def _conv_backward(nd, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, op):
    dtype, groups, kernel, geo_args = _check_conv(nd, x, weight, None, stride, padding, dilation, groups, op)
    check_array(grad_y, "grad_y", nd + 2)
    check_same_dtype(grad_y=grad_y, x=x, weight=weight)
    out = geo_args[4]
    want = (x.shape[0], weight.shape[0]) + tuple(out)
    if grad_y.shape != want:
        raise ValueError(f"{op}: grad_y has shape {grad_y.shape}, the output shape is {want}")
    x5, w3, geo, out = _prepare(nd, x, weight, stride, padding, dilation, groups, kernel, geo_args)
    n = x.shape[0]
    n_groups, mg, kg = w3.shape
    n_threads = numba.get_num_threads()
    dx = np.empty(x.shape, dtype=dtype)
    dw_part = np.zeros((n_threads, n_groups, mg, kg), dtype=dtype)
    db_part = np.zeros((n_threads, n_groups * mg), dtype=dtype)
    if n and grad_y.size:
        rows, ow = geo[12] * geo[13], geo[14]
        rt, n_tiles = _tiling(n_groups * kg, mg, rows, ow, dtype.itemsize, n_threads)
        ws = _workspace(dtype, n_threads, (n_groups * kg + mg) * rt * ow)
        gy = np.ascontiguousarray(grad_y).reshape((n, n_groups, mg, -1))
        _backward_kernel(gy, x5, w3, dx.reshape(x5.shape), dw_part, db_part, ws, geo, rt, n_tiles, n_threads)
    else:
        dx.fill(0)
    grad_w = dw_part.sum(axis=0).reshape(weight.shape)
    grad_b = db_part.sum(axis=0) if bias_grad else None
    return dx, grad_w, grad_b


# ---------------------------------------------------------------------------
# Public API

_ARGS_DOC = """
    ``stride`` and ``dilation`` are ints or tuples (one per spatial dim, > 0);
    ``padding`` is an int or tuple (>= 0), 'valid' (no padding) or 'same'
    (output size = input size; stride 1 only; when ``dilation * (k - 1)`` is odd
    the extra zero goes after the input, as in torch). ``groups`` splits the
    channels into independent convolutions (``groups == C_in`` is depthwise).
    Arrays are float32 or float64, all of one dtype.
"""


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution (cross-correlation) as ``torch.nn.functional.conv1d``.

    ``x`` is (N, C_in, L), ``weight`` (C_out, C_in / groups, kL), ``bias``
    (C_out,) or None. Returns a new (N, C_out, L_out) array.
    """
    return _conv_forward(1, x, weight, bias, stride, padding, dilation, groups, "conv1d")


def conv1d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True):
    """Gradients of :func:`conv1d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False. Arguments as in :func:`conv1d`.
    """
    return _conv_backward(1, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, "conv1d_backward")


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) as ``torch.nn.functional.conv2d``.

    ``x`` is (N, C_in, H, W), ``weight`` (C_out, C_in / groups, kH, kW),
    ``bias`` (C_out,) or None. Returns a new (N, C_out, H_out, W_out) array.
    """
    return _conv_forward(2, x, weight, bias, stride, padding, dilation, groups, "conv2d")


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True):
    """Gradients of :func:`conv2d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False. Arguments as in :func:`conv2d`.
    """
    return _conv_backward(2, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, "conv2d_backward")


def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3-D convolution (cross-correlation) as ``torch.nn.functional.conv3d``.

    ``x`` is (N, C_in, D, H, W), ``weight`` (C_out, C_in / groups, kD, kH, kW),
    ``bias`` (C_out,) or None. Returns a new (N, C_out, D_out, H_out, W_out) array.
    """
    return _conv_forward(3, x, weight, bias, stride, padding, dilation, groups, "conv3d")


def conv3d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True):
    """Gradients of :func:`conv3d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False. Arguments as in :func:`conv3d`.
    """
    return _conv_backward(3, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, "conv3d_backward")


for _f in (conv1d, conv2d, conv3d, conv1d_backward, conv2d_backward, conv3d_backward):
    _f.__doc__ += _ARGS_DOC

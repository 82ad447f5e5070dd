"""Convolutions (1-D, 2-D, 3-D) as GEMMs, forward and backward side by side.

One 3-D implementation serves all three ops (1-D/2-D inputs are views with
leading spatial dims of size 1). Work is split over threads by sample, each
thread with its own slice of a cached workspace and single-threaded
register-tiled GEMMs (``_conv_gemm``); nothing is shared between threads
except read-only inputs (the packed weights).

Stride 1 (1-D/2-D) runs on the *wide grid* (``_implicit_kernel``,
``_wide_backward_kernel``): the sample is copied into a zero-bordered
(C, Hp, Wp) buffer and outputs are computed on Hp x Wp positions, the
kernel's reach past each row discarded, so every row of the column matrix is
one contiguous run of that buffer: the forward reads B through a table of row
offsets (no im2col, no packing), grad weight packs straight from the buffer and
grad input columns fold back by contiguous adds (or, with enough input channels,
grad input is the forward kernel on grad_y with the flipped, transposed weights).

Other strides and 3-D use im2col per sample (or band of output rows), hot in L2:

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
from ._conv_gemm import NR, gemm_implicit, gemm_packed, mr_for, pack_a, pack_b, pack_bt, slp_vectorize
from .im2col import gather_rows, lift3, make_geo, scatter_rows, spatial_params

# Column workspace, all threads together. Each thread's tile (columns of one
# sample, or a band of its output rows, plus one output tile) aims at
# _TILE_BYTES so it stays in the 2 MiB L2 between im2col and the GEMM that
# consumes it; _MAX_WORKSPACE_BYTES is the hard cap for the total (a tile is
# never smaller than one output row, so a single row larger than the cap is the
# only way past it).
_TILE_BYTES = 1 << 20
_MAX_WORKSPACE_BYTES = 64 << 20

# The stride-1 forward runs on the wide grid (no im2col, see _conv_gemm) while
# its wasted columns (the kernel's reach at the end of every output row, and
# the last tile's padding to NR) keep this fraction of the plain columns' tile
# efficiency.
_IMPLICIT = True
_IMPLICIT_MIN_EFFICIENCY = 0.75
_IMPLICIT_DX_MIN_ROWS = 8

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


def _workspace(dtype, n_threads, per_thread, kind=""):
    global _peak_bytes
    key = np.dtype(dtype) if not kind else (kind, np.dtype(dtype))
    ws = _workspaces.get(key)
    if ws is None or ws.shape[0] != n_threads or ws.shape[1] < per_thread:
        old = 0 if ws is None or ws.shape[0] != n_threads else ws.shape[1]
        _workspaces.pop(key, None)
        ws = np.empty((n_threads, max(per_thread, old)), dtype=dtype)
        _workspaces[key] = ws
        _peak_bytes = max(_peak_bytes, workspace_bytes())
    return ws


def _tiling(k, kg, mg, mr, rows, ow, itemsize, n_threads, min_tiles=1):
    """Output rows per tile so one thread's workspace fits _TILE_BYTES (and all threads the cap)."""
    def nbytes(rt):
        return _ws_floats(k, kg, mg, rt * ow, mr) * itemsize

    budget = min(_TILE_BYTES, _MAX_WORKSPACE_BYTES // n_threads)
    rt = rows
    while rt > 1 and nbytes(rt) > budget:
        rt = max(1, min(rt - 1, budget * rt // nbytes(rt)))
    if 2 * rt >= rows and nbytes(rows) * n_threads <= _MAX_WORKSPACE_BYTES:
        rt = rows  # a whole sample beats two tiles
    n_tiles = -(-rows // rt)
    if n_tiles < min_tiles:
        n_tiles = min(rows, min_tiles)
        rt = -(-rows // n_tiles)
        n_tiles = -(-rows // rt)
    return rt, n_tiles, _ws_floats(k, kg, mg, rt * ow, mr)


# ---------------------------------------------------------------------------
# Kernels


@njit(cache=True)
def _pack_weights(w, wp, transpose, mr):
    # w (G, Mg, Kg) -> per group, the packed A operand of W[g] (forward) or W[g].T (grad input)
    for g in range(w.shape[0]):
        if transpose:
            pack_a(w[g].T, wp[g], mr)
        else:
            pack_a(w[g], wp[g], mr)


@njit(parallel=True, cache=True)
def _forward_kernel(x, wp, mg, kg, mr, bias, has_bias, y, ws, geo, rt, n_tiles, n_threads):
    # x (N, C, D, H, W); wp (G, packed Mg x Kg); y flat (N * G * Mg * P); ws (T, per-thread floats)
    n_samples, n_chan = x.shape[0], x.shape[1]
    n_groups = wp.shape[0]
    ow = geo[14]
    rows = geo[12] * geo[13]
    p_all = rows * ow
    k = n_groups * kg
    n_items = n_samples * n_tiles
    for t in prange(n_threads):
        buf = ws[t]
        for it in range(t * n_items // n_threads, (t + 1) * n_items // n_threads):
            n = it // n_tiles
            r0 = (it - n * n_tiles) * rt
            r1 = min(r0 + rt, rows)
            pt = (r1 - r0) * ow
            col = buf[: k * pt].reshape((k, pt))
            bp = buf[k * pt : k * pt + kg * _round_up(pt, NR)]
            ct = buf[buf.size - mr * NR :]
            gather_rows(x[n], col, 0, n_chan, r0, r1, geo)
            for g in range(n_groups):
                pack_b(col[g * kg : (g + 1) * kg], bp)
                c0 = (n * n_groups + g) * mg * p_all + r0 * ow
                gemm_packed(wp[g], bp, mg, pt, kg, mr, y, c0, p_all, False, bias[g * mg :], has_bias, ct)


@njit(parallel=True, cache=True)
def _implicit_kernel(x, wp, mg, kg, mr, bias, has_bias, y, pad, boffs, ph, pw, hp, wpad, ow, n_threads):
    # Stride-1 conv on the wide grid: x (N, C, H, W); pad (T, >= C*hp*wpad + NR) per-thread
    # zero-bordered copies of one sample; boffs (Kg,) B row offsets of group 0; y flat (N, G*Mg, OH*OW).
    n_samples, n_chan, h, w = x.shape
    n_groups = wp.shape[0]
    cg = n_chan // n_groups
    plane = hp * wpad
    p_all = y.size // (n_samples * n_groups * mg)
    nw = (p_all // ow - 1) * wpad + ow
    for t in prange(n_threads):
        buf = pad[t, : n_chan * plane + NR]
        buf[:] = 0  # the borders stay zero: each sample overwrites the interior only
        ct = np.empty(mr * NR, buf.dtype)
        for n in range(t * n_samples // n_threads, (t + 1) * n_samples // n_threads):
            for c in range(n_chan):
                for r in range(h):
                    d0 = c * plane + (r + ph) * wpad + pw
                    dst = buf[d0 : d0 + w]
                    src = x[n, c, r]
                    for e in range(w):
                        dst[e] = src[e]
            for g in range(n_groups):
                gemm_implicit(wp[g], buf, boffs, g * cg * plane, mg, kg, mr, nw, wpad, ow,
                              y, (n * n_groups + g) * mg * p_all, p_all, bias[g * mg :], has_bias, ct)


@njit(parallel=True, cache=True)
def _backward_kernel(gy, x, wtp, mg, kg, mr, dx, dw_part, db_part, ws, geo, rt, n_tiles, n_threads, do_dx):
    # gy (N, G, Mg, P); wtp (G, packed W[g].T); dx like x; dw_part (T, G*Mg*Kg), db_part (T, G*Mg) zeroed
    n_samples, n_chan = x.shape[0], x.shape[1]
    n_groups = wtp.shape[0]
    ow = geo[14]
    rows = geo[12] * geo[13]
    k = n_groups * kg
    zero = gy.dtype.type(0)
    for t in prange(n_threads):
        buf = ws[t]
        ct = buf[buf.size - mr * NR :]
        dw = dw_part[t]
        for n in range(t * n_samples // n_threads, (t + 1) * n_samples // n_threads):
            if do_dx:
                dx[n] = 0
            for tile in range(n_tiles):
                r0 = tile * rt
                r1 = min(r0 + rt, rows)
                pt = (r1 - r0) * ow
                colf = buf[: k * pt]
                col = colf.reshape((k, pt))
                n_b = max(kg * _round_up(pt, NR), _round_up(kg, NR) * pt, mg * _round_up(pt, NR))
                bp = buf[k * pt : k * pt + n_b]
                ap = buf[k * pt + n_b : k * pt + n_b + _round_up(mg, mr) * pt]
                gather_rows(x[n], col, 0, n_chan, r0, r1, geo)
                for g in range(n_groups):
                    band = gy[n, g][:, r0 * ow : r1 * ow]
                    for m in range(mg):
                        s = zero
                        for p in range(pt):
                            s += band[m, p]
                        db_part[t, g * mg + m] += s
                    # grad weight: dW[g] += dy_band @ col[g].T
                    pack_a(band, ap, mr)
                    pack_bt(col[g * kg : (g + 1) * kg], bp)
                    gemm_packed(ap, bp, mg, kg, pt, mr, dw, g * mg * kg, kg, True, ap, False, ct)
                    # grad input columns, over col[g] (no longer needed): W[g].T @ dy_band
                    if do_dx:
                        pack_b(band, bp)
                        gemm_packed(wtp[g], bp, kg, pt, mg, mr, colf, g * kg * pt, pt, False, ap, False, ct)
                if do_dx:
                    scatter_rows(dx[n], col, 0, n_chan, r0, r1, geo)


@njit(parallel=True, cache=True)
def _wide_backward_kernel(gy, x, wtp, mg, kg, mr, dx, dw_part, db_part, ws, boffs, ph, pw, hp, wpad, nwr,
                          n_threads, do_dx):
    # Stride-1 backward on the wide grid (see _implicit_kernel): gy (N, G, Mg, OH, OW); x, dx (N, C, H, W).
    # With grad_y spread onto the wide grid (zeros in the discarded columns) as dyw (G*Mg, nwr), the
    # columns are colw[kk, j] = xp[boffs[kk] + j]: grad weight is dyw @ colw.T, packed straight from
    # the padded sample, and grad input columns W.T @ dyw fold back by one contiguous add per row.
    n_samples, n_chan, h, w = x.shape
    n_groups = wtp.shape[0]
    oh, ow = gy.shape[3], gy.shape[4]
    cg = n_chan // n_groups
    plane = hp * wpad
    xs = n_chan * plane + NR
    kgr = _round_up(kg, NR)
    zero = x.dtype.type(0)
    for t in prange(n_threads):
        buf = ws[t]
        xp = buf[:xs]
        dxp = buf[xs : 2 * xs]
        o = 2 * xs
        dyw = buf[o : o + n_groups * mg * nwr].reshape((n_groups * mg, nwr))
        o += n_groups * mg * nwr
        colw = buf[o : o + kg * nwr].reshape((kg, nwr))
        o += kg * nwr
        bt = buf[o : o + kgr * nwr]
        o += kgr * nwr
        ap = buf[o : o + _round_up(mg, mr) * nwr]
        o += _round_up(mg, mr) * nwr
        bp = buf[o : o + mg * nwr]
        o += mg * nwr
        ct = buf[o : o + mr * NR]
        buf[: o] = 0  # borders, discarded columns and the tile's padding rows stay zero
        dw = dw_part[t]
        for n in range(t * n_samples // n_threads, (t + 1) * n_samples // n_threads):
            for c in range(n_chan):
                for r in range(h):
                    d0 = c * plane + (r + ph) * wpad + pw
                    dst = xp[d0 : d0 + w]
                    src = x[n, c, r]
                    for e in range(w):
                        dst[e] = src[e]
            for g in range(n_groups):
                for m in range(mg):
                    row = dyw[g * mg + m]
                    s = zero
                    for r in range(oh):
                        src = gy[n, g, m, r]
                        dst = row[r * wpad : r * wpad + ow]
                        for e in range(ow):
                            dst[e] = src[e]
                            s += src[e]
                    db_part[t, g * mg + m] += s
            for g in range(n_groups):
                base = g * cg * plane
                # grad weight: dW[g] += dyw[g] @ colw.T, colw.T packed into NR-column panels
                for kk in range(kg):
                    src = xp[base + boffs[kk] : base + boffs[kk] + nwr]
                    pan = bt[(kk // NR) * nwr * NR + kk % NR :]
                    for j in range(nwr):
                        pan[j * NR] = src[j]
                band = dyw[g * mg : (g + 1) * mg]
                pack_a(band, ap, mr)
                gemm_packed(ap, bt, mg, kg, nwr, mr, dw, g * mg * kg, kg, True, ap, False, ct)
                if do_dx:
                    pack_b(band, bp)
                    gemm_packed(wtp[g], bp, kg, nwr, mg, mr, colw.reshape(-1), 0, nwr, False, ap, False, ct)
                    for kk in range(kg):
                        dst = dxp[base + boffs[kk] : base + boffs[kk] + nwr]
                        src = colw[kk]
                        for j in range(nwr):
                            dst[j] += src[j]
            if do_dx:
                for c in range(n_chan):
                    for r in range(h):
                        d0 = c * plane + (r + ph) * wpad + pw
                        src = dxp[d0 : d0 + w]
                        dst = dx[n, c, r]
                        for e in range(w):
                            dst[e] = src[e]
                dxp[:] = 0


@njit(inline="always")
def _round_up(a, b):
    return (a + b - 1) // b * b


def _ws_floats(k, kg, mg, pt, mr):
    """Per-thread workspace (elements) for a tile of ``pt`` outputs: columns, packed B, packed A, C tile."""
    n_b = max(kg * _round_up_py(pt, NR), _round_up_py(kg, NR) * pt, mg * _round_up_py(pt, NR))
    return k * pt + n_b + _round_up_py(mg, mr) * pt + mr * NR


def _wide_ws_floats(x_floats, m, kg, mg, mr, nwr):
    """Per-thread workspace (elements) of the wide-grid backward: padded x and dx, wide grad_y,
    columns, their packed transpose, packed grad_y as A and as B, C tile."""
    return (2 * (x_floats + NR) + m * nwr + kg * nwr + _round_up_py(kg, NR) * nwr
            + _round_up_py(mg, mr) * nwr + mg * nwr + mr * NR)


def _round_up_py(a, b):
    return -(-a // b) * b


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


def _implicit_geometry(geo, x_hw, c_in, itemsize):
    """(ph, pw, Hp, Wp) of the stride-1 wide-grid path for ``geo``, or None where it does not apply.

    It applies to 1-D/2-D stride-1 convolutions whose wide grid wastes little
    more of the NR-wide tiles than the plain columns do, and whose padded
    per-thread copies fit the workspace cap.
    """
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, od, oh, ow = geo
    if kd != 1 or od != 1 or pd != 0 or sd != 1 or sh != 1 or sw != 1:
        return None
    hp, wpad = oh + (kh - 1) * dh, ow + (kw - 1) * dw
    if ph < 0 or pw < 0 or hp - x_hw[0] - ph < 0 or wpad - x_hw[1] - pw < 0:
        return None
    nw = (oh - 1) * wpad + ow  # wide columns up to the last real output
    if _round_up_py(oh * ow, NR) < _IMPLICIT_MIN_EFFICIENCY * _round_up_py(nw, NR):
        return None
    if (c_in * hp * wpad + NR) * itemsize * numba.get_num_threads() > _MAX_WORKSPACE_BYTES:
        return None
    return ph, pw, hp, wpad


def _implicit_conv(x4, w3, bias, has_bias, kernel_hw, dil_hw, igeo, ow, y):
    """Stride-1 convolution of x4 (N, C, H, W) by w3 (G, Mg, C/G * kH * kW) on the wide grid into flat y."""
    n, c = x4.shape[:2]
    n_groups, mg, kg = w3.shape
    ph, pw, hp, wpad = igeo
    (kh, kw), (dh, dw) = kernel_hw, dil_hw
    cg = c // n_groups
    boffs = (np.arange(cg)[:, None, None] * (hp * wpad) + np.arange(kh)[None, :, None] * (dh * wpad)
             + np.arange(kw)[None, None, :] * dw).reshape(-1).astype(np.int64)
    n_threads = numba.get_num_threads()
    mr = mr_for(x4.dtype)
    pad = _workspace(x4.dtype, n_threads, c * hp * wpad + NR, "pad")
    wp = np.empty((n_groups, _round_up_py(mg, mr) * kg), x4.dtype)
    with slp_vectorize():
        _pack_weights(w3, wp, False, mr)
        _implicit_kernel(x4, wp, mg, kg, mr, bias, has_bias, y, pad, boffs, ph, pw, hp, wpad, ow, n_threads)


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
    mr = mr_for(dtype)
    rt, n_tiles, per_thread = _tiling(n_groups * kg, kg, mg, mr, rows, ow, dtype.itemsize, n_threads,
                                      min_tiles=-(-n_threads // n))
    has_bias = bias is not None
    b = np.ascontiguousarray(bias) if has_bias else np.zeros(1, dtype)
    igeo = _implicit_geometry(geo, x5.shape[3:], x5.shape[1], dtype.itemsize) if _IMPLICIT else None
    if igeo is not None:
        _implicit_conv(x5.reshape(x5.shape[:2] + x5.shape[3:]), w3, b, has_bias, geo[1:3], geo[10:12], igeo, ow, y.reshape(-1))
        return y
    ws = _workspace(dtype, n_threads, per_thread)
    wp = np.empty((n_groups, _round_up_py(mg, mr) * kg), dtype)
    with slp_vectorize():
        _pack_weights(w3, wp, False, mr)
        _forward_kernel(x5, wp, mg, kg, mr, b, has_bias, y.reshape(-1), ws, geo, rt, n_tiles, n_threads)
    return y


def _transposed_geometry(geo, cg, x_hw, c_out, itemsize):
    """Wide-grid geometry of grad_x as a stride-1 convolution of grad_y, or None.

    grad_y is padded by the kernel's reach minus the forward padding on each
    side (a forward padding beyond the reach would need cropping instead).
    """
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, od, oh, ow = geo
    if cg < _IMPLICIT_DX_MIN_ROWS or kd != 1 or od != 1 or pd != 0 or sd != 1 or sh != 1 or sw != 1:
        return None
    if oh - x_hw[0] < 0 or ow - x_hw[1] < 0:
        return None  # grad_y's padding would be wider than the forward's: more multiply-adds
    tgeo = (1, kh, kw, 1, 1, 1, 0, (kh - 1) * dh - ph, (kw - 1) * dw - pw, 1, dh, dw, 1) + tuple(x_hw)
    return _implicit_geometry(tgeo, (oh, ow), c_out, itemsize)


def _conv_backward(nd, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, op, input_grad=True):
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
    # grad_x is skipped (and None) for a layer fed by data: the first layer of a model
    dx = np.empty(x.shape if input_grad else (0,) * x.ndim, dtype=dtype)
    dw_part = np.zeros((n_threads, n_groups, mg, kg), dtype=dtype)
    db_part = np.zeros((n_threads, n_groups * mg), dtype=dtype)
    if n and grad_y.size:
        rows, ow = geo[12] * geo[13], geo[14]
        mr = mr_for(dtype)
        igeo = _implicit_geometry(geo, x5.shape[3:], x5.shape[1], dtype.itemsize) if _IMPLICIT else None
        tgeo = (_transposed_geometry(geo, x5.shape[1] // n_groups, x5.shape[3:], n_groups * mg, dtype.itemsize)
                if _IMPLICIT and input_grad else None)
        gy = np.ascontiguousarray(grad_y).reshape((n, n_groups, mg, -1))
        wtp = np.empty((n_groups, _round_up_py(kg, mr) * mg), dtype)
        dwf = dw_part.reshape((n_threads, -1))
        if igeo is not None:
            ph, pw, hp, wpad = igeo
            nwr = _round_up_py((geo[13] - 1) * wpad + geo[14], NR)
            per_thread = _wide_ws_floats(x5.shape[1] * hp * wpad, n_groups * mg, kg, mg, mr, nwr)
            if per_thread * dtype.itemsize * n_threads > _MAX_WORKSPACE_BYTES:
                igeo = None
        dx5_shape = x5.shape if input_grad else (0,) * 5
        with slp_vectorize():
            _pack_weights(w3, wtp, True, mr)
            if igeo is not None:
                ws = _workspace(dtype, n_threads, per_thread, "wide")
                cg = x5.shape[1] // n_groups
                boffs = (np.arange(cg)[:, None, None] * (hp * wpad)
                         + np.arange(geo[1])[None, :, None] * (geo[10] * wpad)
                         + np.arange(geo[2])[None, None, :] * geo[11]).reshape(-1).astype(np.int64)
                x4 = x5.reshape(x5.shape[:2] + x5.shape[3:])
                _wide_backward_kernel(gy.reshape((n, n_groups, mg, geo[13], geo[14])), x4, wtp, mg, kg,
                                      mr, dx.reshape(x4.shape if input_grad else (0,) * 4), dwf, db_part, ws, boffs, ph, pw, hp,
                                      wpad, nwr, n_threads, input_grad and tgeo is None)
            else:
                rt, n_tiles, per_thread = _tiling(n_groups * kg, kg, mg, mr, rows, ow, dtype.itemsize, n_threads)
                ws = _workspace(dtype, n_threads, per_thread)
                _backward_kernel(gy, x5, wtp, mg, kg, mr, dx.reshape(dx5_shape), dwf, db_part, ws, geo, rt,
                                 n_tiles, n_threads, input_grad and tgeo is None)
        if tgeo is not None:
            # stride 1: grad_x is grad_y convolved with the flipped, channel-transposed weights
            kh, kw = geo[1], geo[2]
            cg = x5.shape[1] // n_groups
            wt = np.ascontiguousarray(w3.reshape(n_groups, mg, cg, kh, kw)[:, :, :, ::-1, ::-1]
                                      .transpose(0, 2, 1, 3, 4)).reshape(n_groups, cg, mg * kh * kw)
            _implicit_conv(gy.reshape((n, n_groups * mg, geo[13], geo[14])), wt, np.zeros(1, dtype), False,
                           (kh, kw), geo[10:12], tgeo, x5.shape[4], dx.reshape(-1))
    else:
        dx.fill(0)
    grad_w = dw_part.sum(axis=0).reshape(weight.shape)
    grad_b = db_part.sum(axis=0) if bias_grad else None
    return (dx if input_grad else None), grad_w, grad_b


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


def conv1d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True):
    """Gradients of :func:`conv1d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False, and ``grad_x`` is None (and not computed) when
    ``input_grad`` is False, as for a model's first layer. Arguments as in :func:`conv1d`.
    """
    return _conv_backward(1, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv1d_backward", input_grad)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) as ``torch.nn.functional.conv2d``.

    ``x`` is (N, C_in, H, W), ``weight`` (C_out, C_in / groups, kH, kW),
    ``bias`` (C_out,) or None. Returns a new (N, C_out, H_out, W_out) array.
    """
    return _conv_forward(2, x, weight, bias, stride, padding, dilation, groups, "conv2d")


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True):
    """Gradients of :func:`conv2d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False, and ``grad_x`` is None (and not computed) when
    ``input_grad`` is False, as for a model's first layer. Arguments as in :func:`conv2d`.
    """
    return _conv_backward(2, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv2d_backward", input_grad)


def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3-D convolution (cross-correlation) as ``torch.nn.functional.conv3d``.

    ``x`` is (N, C_in, D, H, W), ``weight`` (C_out, C_in / groups, kD, kH, kW),
    ``bias`` (C_out,) or None. Returns a new (N, C_out, D_out, H_out, W_out) array.
    """
    return _conv_forward(3, x, weight, bias, stride, padding, dilation, groups, "conv3d")


def conv3d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True):
    """Gradients of :func:`conv3d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False, and ``grad_x`` is None (and not computed) when
    ``input_grad`` is False, as for a model's first layer. Arguments as in :func:`conv3d`.
    """
    return _conv_backward(3, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv3d_backward", input_grad)


for _f in (conv1d, conv2d, conv3d, conv1d_backward, conv2d_backward, conv3d_backward):
    _f.__doc__ += _ARGS_DOC


def _warmup(dtype):
    """Compile the conv kernels for ``dtype`` (the 2-D path serves 1-D and 3-D too): the stride-1
    wide-grid forward and backward (grad_x both by columns and as a transposed convolution),
    and the im2col path of other strides."""
    x = np.ones((1, 8, 6, 6), dtype)
    for w, stride in ((np.ones((2, 4, 3, 3), dtype), 1), (np.ones((2, 8, 3, 3), dtype), 1),
                      (np.ones((2, 4, 3, 3), dtype), 2)):
        groups = x.shape[1] // w.shape[1]
        y = conv2d(x, w, np.ones(w.shape[0], dtype), stride=stride, padding=1, groups=groups)
        conv2d_backward(np.ones_like(y), x, w, stride=stride, padding=1, groups=groups)

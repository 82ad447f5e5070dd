"""Convolutions (1-D, 2-D, 3-D) as GEMMs on gemm.py's micro-kernel, forward and backward side by side.

One 3-D implementation serves all three ops (1-D and 2-D inputs are views
with leading spatial dims of size 1). Per group g, with K = C_in/G * kernel
volume reduction rows and the output positions of one sample as columns:

* forward:     ``y[n, g]  = W[g] @ cols[g]``               (+ bias per row)
* grad weight: ``dW[g]   += dy[n, g] @ cols[g].T``          per-thread partials
* grad input:  ``dcols[g] = W[g].T @ dy[n, g]``, folded back onto ``dx[n]``; or on
  the wide grid, where that is cheaper, gathered as a transposed convolution
  (``dx[n, g] = W~[g] @ dy-windows``, below)

Every sample is first copied into a zero-bordered grid (C, Dp, Hp, Wp) that
holds each tap of each window, so no loop over the columns tests a border.
The columns come from that grid in one of two ways:

* the **wide grid** (every stride 1): output (od, oh, ow) is computed at grid
  column ``(od*Hp + oh)*Wp + ow``, so row (c, kd, kh, kw) of ``cols`` is one
  contiguous run of the grid starting at ``c*Dp*Hp*Wp + kd*dD*Hp*Wp +
  kh*dH*Wp + kw*dW``, read in place by the micro-kernel through a table of
  row offsets: no im2col at all. Grid columns past OW (the kernel's reach at
  the end of each row) are computed and dropped; in the backward, grad_y is
  spread onto the grid with zeros there, and grad input folds back by
  contiguous adds. Or it is gathered: input grid column X takes
  ``W[co, c, tap] * dy[co, X - offset(tap)]`` summed over (co, tap), each
  channel of dy laid among enough zeros that every such read off an output
  is zero, so no fold and no test of a border (C/G rows, Mg x taps deep).
* **explicit columns** (other strides, or where the dropped columns would cost
  more than a copy, ``_IM2COL_COST``): a band of output rows is gathered from
  the grid into a buffer hot in L2, packed into NR-column panels for the
  forward and row-major for the backward; grad input folds back onto the
  grid. A sample too large for a per-thread grid gathers straight from the
  input instead (``gather_rows``/``scatter_rows`` of im2col.py).

The weight gradient reads both operands along the output positions: with few
output channels through inner-product tiles (``gemm.dot_tile``), otherwise as
``dW[g].T = cols @ dy.T`` with dy transposed into NR-channel panels. Where a
sample's positions are few, a thread stages the grids and grad_y of several
samples and each inner-product tile reduces over all of them at once.

A 3x3, stride-1 ``conv2d`` whose channels fill the micro-kernel's panels runs instead as
Winograd F(4x4, 3x3), 36 GEMMs over transformed tiles (winograd.py, ``_winograd_forward``
and ``_winograd_backward`` below): 36 multiply-adds per 4x4 output tile and channel pair
where this path does 144.

The forward hands out samples (or bands of one, when there are fewer samples
than threads) from a shared atomic counter as threads come free, so a core
slowed by another process does less of the work. The backward gives each
thread a fixed share of the samples, so grad weight goes into per-thread
partials summed in a fixed order and results are deterministic for a given
thread count. Nothing is written by two threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_same_dtype, plain, remember
from ._codegen import vectorized, zeros
from .gemm import (DOT_SHAPES, NR, _bias_relu_vector, _cdiv, _channel_panel, _claim, _lanes, _mr, _pack_a,
                   _stack_array, _tail,
                   _tile_rows, borrowed, dot_tile, dot_tile_3x5,
                   tiles_a_rows, tiles_b_panels, tiles_b_rows)
from .im2col import gather_rows, lift3, make_geo, scatter_rows, spatial_params
from .pool import _max_2x2_back_row, _max_2x2_row
from .threads import get_num_threads
from . import winograd

# Per-thread scratch (padded sample, column band, output tile rows) aims at
# _THREAD_BYTES so it stays in the 2 MiB L2 from the copy that fills it to the
# GEMM that reads it; _MAX_WORKSPACE_BYTES caps all threads together (a band
# is never less than one output row, the only way past the cap).
_THREAD_BYTES = 1 << 20
_MAX_WORKSPACE_BYTES = 64 << 20
# One im2col element (a gather into the column band) costs about as much time
# as this many multiply-adds in the micro-kernel; it decides between explicit
# columns and the wide grid, whose dropped columns are wasted multiply-adds.
_IM2COL_COST = 16
# The weight gradient uses inner-product tiles (gemm.dot_tile) when their
# per-lane partial sums fit this (narrow layers, where an NR-wide tile of
# output channels would be mostly padding), NR-wide tiles otherwise.
_DOT_PARTIAL_BYTES = 256 << 10
# Their shape (gemm.DOT_SHAPES): None picks the one that pads (Mg, K) least, tests force one.
_DOT_SHAPE = None
# The inner-product tiles of the weight gradient reduce over at least this many vectors
# when samples are short (whole samples staged per thread, see _Plan): fewer, and loading
# and storing the partial sums dominates; many more, and the staged samples leave L1.
_STAGE_VECTORS = 64
# None picks the column source by cost; tests force "wide", "columns" (gathered from the
# grid) or "direct" (gathered from the input, no grid) where it applies.
_FORCE = None
# Grad input on the wide grid, gathered as a transposed convolution costs one multiply-add per
# (input channel, grid column, output channel, tap), against W.T @ dy plus its fold onto the grid,
# about this many multiply-adds per (K row, column) added back; None picks by that cost, tests
# force True (gathered) or False (folded). Fit to interleaved A/B runs of both (float32, 2
# threads): gathered 3-4% faster where the two costs break even at 7.5-7.9, folded 2.5-13%
# faster at 8.2-17.5, LeNet5's second layer among them (16.1; its training step 1.22x).
_FOLD_COST = 8
_DX_GATHER = None
# 3x3 stride-1 convs with enough channels (winograd.worthwhile) run as Winograd F(4x4, 3x3):
# None picks that way; tests force False (never) or True (wherever the shape allows).
_WINOGRAD = None

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


def _workspace(kind, dtype, n_threads, per_thread):
    """Zeroed (n_threads, >= per_thread) scratch, kept between calls and grown on demand."""
    global _peak_bytes
    key = (kind, np.dtype(dtype))
    ws = _workspaces.get(key)
    if ws is None or ws.shape[0] != n_threads or ws.shape[1] < per_thread:
        old = 0 if ws is None or ws.shape[0] != n_threads else ws.shape[1]
        _workspaces.pop(key, None)
        ws = np.zeros((n_threads, max(per_thread, old)), dtype=dtype)
        _workspaces[key] = ws
        _peak_bytes = max(_peak_bytes, workspace_bytes())
    return ws


# ---------------------------------------------------------------------------
# Index helpers

_vector_register = _stack_array(lambda dt: 64 * 8 // dt.bitwidth)


@njit(inline="always")
def _grid_col(r, oh, hw, ww):
    """Grid column of the first output of output row ``r = od * OH + oh``."""
    od = r // oh
    return (od * hw + r - od * oh) * ww


@njit(inline="always")
def _band(r0, r1, geo, grid):
    """(first grid column, number of grid columns) of output rows [r0, r1)."""
    oh, ow = geo[13], geo[14]
    j0 = _grid_col(r0, oh, grid[1], grid[2])
    return j0, _grid_col(r1 - 1, oh, grid[1], grid[2]) + ow - j0


@njit(cache=True, _nrt=False)
def _band_rows(r0, r1, geo, grid, ogrid, win, ocol):
    """Per output row of the band [r0, r1): ``win``, the grid offset of its first window (tap 0,
    channel 0), and ``ocol``, its first column relative to the band's. Returns (j0, ncol) of
    :func:`_band`. Computed once per band, so no row loop divides."""
    oh = geo[13]
    od = r0 // oh
    o_h = r0 - od * oh
    j0, ncol = _band(r0, r1, geo, ogrid)
    for rr in range(r1 - r0):
        win[rr] = (od * geo[3] * grid[1] + o_h * geo[4]) * grid[2]
        ocol[rr] = (od * ogrid[1] + o_h) * ogrid[2] - j0
        o_h += 1
        if o_h == oh:
            o_h = 0
            od += 1
    return j0, ncol


@njit(inline="always")
def _round_up(a, b):
    return (a + b - 1) // b * b


@njit(cache=True, _nrt=False)
def _grid_copy(xn, xg, geo, grid, to_grid, cstride):
    """Sample ``xn`` (C, D, H, W) into the interior of the zero-bordered grid ``xg`` (flat,
    channel c's Dp x Hp x Wp at ``c * cstride``), or with ``to_grid`` False that interior back
    into ``xn`` (the adjoint of padding drops the borders). Input past the last tap a strided
    window reaches is left out.
    """
    n_chan, d, h, w = xn.shape
    pd, ph, pw = geo[6], geo[7], geo[8]
    dp, hp, wp = grid
    run = min(w, wp - pw)
    for c in range(n_chan):
        for z in range(min(d, dp - pd)):
            for r in range(min(h, hp - ph)):
                o = c * cstride + ((z + pd) * hp + r + ph) * wp + pw
                inside = _tail(xg, o)
                sample = xn[c, z, r]
                if to_grid:
                    for e in range(run):
                        inside[e] = sample[e]
                else:
                    for e in range(run):
                        sample[e] = inside[e]


@njit(cache=True, _nrt=False)
def _columns(xg, col, ld, goffs, n_rows_band, win, geo, fold):
    """Explicit columns ``col[k, rr*OW + ow]`` (rows ld apart) of a band of output rows whose
    windows start at ``win``, gathered from the grid ``xg``; with ``fold`` the adjoint,
    ``xg += fold(col)`` (the caller owns xg)."""
    ow, sw = geo[14], geo[5]
    vl = _lanes(col)
    for kk in range(goffs.size):
        for rr in range(n_rows_band):
            s0 = goffs[kk] + win[rr]
            d0 = kk * ld + rr * ow
            if fold:
                src = _tail(col, d0)
                if sw == 1:
                    dst = _tail(xg, s0)
                    for e in range(ow):
                        dst[e] += src[e]
                else:
                    dst = xg[s0:]
                    for e in range(ow):
                        dst[e * sw] += src[e]
            else:
                _run_copy(xg, s0, sw, col, d0, ow, vl)


@njit(cache=True, _nrt=False)
def _panel_columns(xg, col, goffs, n_rows_band, win, geo, pieces):
    """The columns of a band packed for the micro-kernel: column j of row k at
    ``col[(j // NR) * rows * NR + k * NR + j % NR]``, the last panel zero padded.

    A panel's 32 columns are pieces of output rows, the same for every row k:
    they are listed once per panel in ``pieces`` (3 x NR ints: destination,
    grid offset after goffs[k], length) and copied for each k.
    """
    ow, sw = geo[14], geo[5]
    vl = _lanes(col)
    n_rows = goffs.size
    ncol = n_rows_band * ow
    zero = col.dtype.type(0)
    for q in range(_cdiv(ncol, NR)):
        j_lo, j_hi = q * NR, min(q * NR + NR, ncol)
        n_pieces = 0
        j = j_lo
        while j < j_hi:
            rr = j // ow
            e = j - rr * ow
            pieces[0, n_pieces] = j - j_lo
            pieces[1, n_pieces] = win[rr] + e * sw
            pieces[2, n_pieces] = min(ow - e, j_hi - j)
            j += pieces[2, n_pieces]
            n_pieces += 1
        for kk in range(n_rows):
            base = q * n_rows * NR + kk * NR
            for i in range(n_pieces):
                _run_copy(xg, goffs[kk] + pieces[1, i], sw, col, base + pieces[0, i], pieces[2, i], vl)
    last = (_cdiv(ncol, NR) - 1) * n_rows * NR
    for kk in range(n_rows):
        for jj in range(ncol - (_cdiv(ncol, NR) - 1) * NR, NR):
            col[last + kk * NR + jj] = zero


@njit(inline="always")
def _run_copy(xg, s0, sw, col, d0, n, vl):
    """``col[d0:d0 + n] = xg[s0:s0 + n*sw:sw]``. With stride 1 it copies whole vectors: the
    spill past n lands where the caller writes later (or in the slack), never on a result."""
    if sw == 1:
        dst = _tail(col, d0)
        src = _tail(xg, s0)
        reg = _vector_register(col)  # all loads before the stores: the two may alias, so
        for v0 in range(0, n, vl):   # only this order lets them fuse into one vector each
            for e in range(vl):
                reg[e] = src[v0 + e]
            for e in range(vl):
                dst[v0 + e] = reg[e]
    else:
        dst = col[d0:d0 + n]
        src = xg[s0:]
        for e in range(n):
            dst[e] = src[e * sw]


# Where the micro-kernel reads the columns from (see the module docstring).
WIDE, GRID_COLUMNS, DIRECT_COLUMNS = 0, 1, 2


@njit(cache=True, _nrt=False)
def _fill_source(xn, xg, col, mode, geo, grid, ogrid, goffs, r0, r1, ld, win, ocol):
    """Make the column rows of output rows [r0, r1) readable; return (j0, jb, ncol).

    j0 is the band's first column in the output grid ``ogrid``, jb where that
    column sits in each row of the source, ncol the band's width; ``win`` and
    ``ocol`` get the band's rows (:func:`_band_rows`). The wide grid is the
    source itself (the caller fills it once per sample, jb = j0); explicit
    columns are gathered for the band alone (jb = 0), rows ``ld`` apart, from
    the grid or, when no grid fits, straight from ``xn``.
    """
    j0, ncol = _band_rows(r0, r1, geo, grid, ogrid, win, ocol)
    if mode == WIDE:
        return j0, j0, ncol
    n_rows = goffs.size
    if mode == GRID_COLUMNS:
        _columns(xg, col, ld, goffs, r1 - r0, win, geo, False)
    else:
        gather_rows(xn, col[:n_rows * ld].reshape((n_rows, ld)), 0, xn.shape[0], r0, r1, geo)
    zero = col.dtype.type(0)
    for kk in range(n_rows):  # tiles read up to NR-aligned widths: keep stale values out
        tail = col[kk * ld + ncol:kk * ld + _round_up(ncol, NR)]
        for e in range(tail.size):
            tail[e] = zero
    return j0, 0, ncol


# ---------------------------------------------------------------------------
# Kernels


@njit(cache=True, fastmath={"reassoc"}, _nrt=False)
def _sum_span(v):
    """Sum of a 1-D span in vector-wide partial sums (a plain ``+=`` chain is one add per 4 cycles)."""
    s = v.dtype.type(0)
    for e in range(v.size):
        s += v[e]
    return s


@njit(cache=True, _nrt=False)
def _spread_rows(row, g, y, relu, ocol, n_rows, ow, fresh):
    """One channel's grad_y band onto its output-grid row: output row rr (``g[rr*ow:]``, zero
    where ``y <= 0`` with ``relu``) at ``row[ocol[rr]:]``, zeros elsewhere. Returns the row's sum
    (the bias gradient's share).

    The zeros are written only when ``fresh``: a row that last held a band of the same rows
    (the same positions) already has them, and the zeroing was a third of the spread.

    The ReLU mask is applied as the rows are copied, not in a pass of its own over the band
    (SmallCNN's first layer backward: 14% faster). The row is zeroed whole first and summed
    whole after: zeroing only the gaps between rows, or summing as the rows are copied, ran
    as many tiny loops (memset calls, one horizontal add per row) and was slower on LeNet5.
    """
    zero = row.dtype.type(0)
    if fresh:
        for e in range(row.size):
            row[e] = zero
    for rr in range(n_rows):
        c0 = ocol[rr]
        dst = _tail(row, c0)
        src = _tail(g, rr * ow)
        if relu:
            pos_y = _tail(y, rr * ow)
            for e in range(ow):
                dst[e] = src[e] if pos_y[e] > 0 else zero
        else:
            for e in range(ow):
                dst[e] = src[e]
    return _sum_span(row)


@njit(cache=True, _nrt=False)
def _spread_pooled(row, g, idx, y, relu, ocol, r0, r1, ow):
    """:func:`_spread_rows` for a conv followed by a 2x2 stride-2 max pool: one channel's pooled
    gradient ``g`` (its plane, (OH//2) x (OW//2) flat), routed by the pool's indices ``idx``
    (``h*OW + w`` in the conv output plane) onto conv output rows [r0, r1) (r0 even) of the
    output-grid row, with ``relu`` only where the pool's output ``y`` is positive. Every
    other element is zero: a last odd row or column is in no window. Returns (the row's sum,
    how many indices were outside their window)."""
    zero = row.dtype.type(0)
    for e in range(row.size):
        row[e] = zero
    pw = ow // 2
    bad = 0
    for ph in range(r0 // 2, r1 // 2):
        c0 = ocol[2 * ph - r0]
        bad += _max_2x2_back_row(g, ph * pw, idx, 2 * ph * ow, pw, row, c0, ow, ocol[2 * ph + 1 - r0] - c0, y, relu)
    return _sum_span(row), bad


@njit(cache=True, _nrt=False)
def _pack_weights(w, wpk, transpose, mr):
    # w (G, Mg, K): per group, W[g] (forward, Mg x K) or W[g].T (grad input, K x Mg) in MR-row panels
    mg, k = w.shape[1], w.shape[2]
    for g in range(w.shape[0]):
        flat = w[g].reshape(-1)
        if transpose:
            _pack_a(flat, 0, 1, k, k, mg, wpk[g], mr)
        else:
            _pack_a(flat, 0, k, 1, mg, k, wpk[g], mr)


@njit(parallel=True, cache=True)
def _forward_kernel(x, wpk, bias, has_bias, relu, y, pooled, pidx, ws, boffs, goffs, geo, grid, ogrid, mode, rt,
                    n_bands, mg, k, gstride, grid_len, col_len, ld, n_threads):
    # x (N, C, D, H, W); wpk (G, packed Mg x K); y (N, G*Mg, P); ws (T, >= grid + columns + Mg~*ld + tile).
    # With ``pooled``, y (N, G*Mg, P/4) and pidx get the 2x2 stride-2 max pool of the output
    # and its indices instead, from the epilogue (bands then start on even rows)
    x, wpk, bias, y, ws, boffs, goffs = (borrowed(x), borrowed(wpk), borrowed(bias), borrowed(y), borrowed(ws),
                                         borrowed(boffs), borrowed(goffs))
    pidx = borrowed(pidx)
    n_samples = x.shape[0]
    n_groups = wpk.shape[0]
    oh, ow = geo[13], geo[14]
    rows = geo[12] * oh
    mr = _tile_rows(x)
    mgp = _round_up(mg, mr)
    plane = grid[0] * grid[1] * grid[2]
    n_items = n_samples * n_bands
    unit = n_bands if n_samples >= 2 * n_threads else 1  # whole samples when there are enough
    n_units = _cdiv(n_items, unit)
    claims = zeros(1, np.int64)
    zero = y.dtype.type(0)
    vl = _lanes(y)
    for t in prange(n_threads):
        buf = ws[t]
        xg = buf[:grid_len]
        col = buf[grid_len:grid_len + col_len]
        cbuf = buf[grid_len + col_len:grid_len + col_len + mgp * ld]
        tile = buf[grid_len + col_len + mgp * ld:]
        src = xg if mode == WIDE else col
        win = np.empty(rt, np.int64)
        ocol = np.empty(rt, np.int64)
        pieces = np.empty((3, NR), np.int64)
        xg[:] = zero  # the grid's borders: each sample then overwrites the interior only
        current = -1
        while True:  # samples (or bands) from a shared counter: a slowed core takes fewer
            u = _claim(claims, 0)
            if u >= n_units:
                break
            for it in range(u * unit, min(n_items, (u + 1) * unit)):
                n = it // n_bands
                r0 = (it - n * n_bands) * rt
                r1 = min(r0 + rt, rows)
                if mode != DIRECT_COLUMNS and n != current:
                    _grid_copy(x[n], xg, geo, grid, True, plane)
                    current = n
                if mode == GRID_COLUMNS:
                    j0, ncol = _band_rows(r0, r1, geo, grid, ogrid, win, ocol)
                    _panel_columns(xg, col, goffs, r1 - r0, win, geo, pieces)
                else:
                    j0, jb, ncol = _fill_source(x[n], xg, col, mode, geo, grid, ogrid, goffs, r0, r1, ld, win, ocol)
                for g in range(n_groups):
                    if mode == GRID_COLUMNS:
                        tiles_b_panels(mg, ncol, k, wpk[g], col, g * k * NR, goffs.size * NR, cbuf, ld, tile)
                    else:
                        tiles_b_rows(mg, ncol, k, wpk[g], src, g * gstride + jb, boffs, cbuf, ld, tile)
                    for co in range(mg):
                        bv = bias[g * mg + co] if has_bias else zero
                        yrow = y[n, g * mg + co]
                        if pooled:  # bias, ReLU and the pool's window maxima, from the tile rows
                            prow = pidx[n, g * mg + co]
                            pw = ow // 2
                            for ph in range(r0 // 2, r1 // 2):
                                c0, c1 = ocol[2 * ph - r0], ocol[2 * ph + 1 - r0]
                                _max_2x2_row(cbuf, co * ld + c0, ow, c1 - c0, yrow, ph * pw, pw, prow, 2 * ph * ow,
                                             True, bv, relu)
                            continue
                        for rr in range(r1 - r0):  # bias and the fused ReLU: one pass over y
                            c0 = co * ld + ocol[rr]
                            for e in range(0, ow, vl):  # masked vectors: ow is known at run time only
                                _bias_relu_vector(yrow, (r0 + rr) * ow + e, cbuf, c0 + e, ow - e, bv, relu)


@njit(inline="always")
def _dot_shape(dwp, vl):
    """(rows, columns) of the inner-product tiles whose partials ``dwp`` holds (R*S*VL per tile)."""
    return DOT_SHAPES[1] if dwp.shape[-1] == DOT_SHAPES[1][0] * DOT_SHAPES[1][1] * vl else DOT_SHAPES[0]


@njit(cache=True, _nrt=False)
def _dot_tiles(g, n_runs, dyw, dystep, src, sstep, aoffs, toffs, dwp_g, mg, k, ld, gstride, jb, lpad, boffs):
    """dW[g] += dyw[g] @ cols.T over ``n_runs`` samples, both read in place (inner-product tiles)."""
    vl = _lanes(dyw)
    tr, ts = _dot_shape(dwp_g, vl)
    for i in range(dwp_g.shape[0]):
        for r in range(tr):
            aoffs[r] = (g * mg + min(i * tr + r, mg - 1)) * ld
        for j in range(dwp_g.shape[1]):
            for s_ in range(ts):
                toffs[s_] = g * gstride + jb + boffs[min(j * ts + s_, k - 1)]
            if tr == DOT_SHAPES[0][0]:
                dot_tile(lpad // vl, n_runs, dyw, aoffs, dystep, src, toffs, sstep, dwp_g[i, j], 0)
            else:
                dot_tile_3x5(lpad // vl, n_runs, dyw, aoffs, dystep, src, toffs, sstep, dwp_g[i, j], 0)


@njit(parallel=True, cache=True)
def _backward_kernel(gy, yr, relu, pidx, pooled, nbad, x, wtpk, dx, dwt, dwp, db, ws, boffs, arows, dyoffs, goffs,
                     geo, grid, ogrid, mode, rt, n_bands, mg, k, gstride, grid_len, col_len, ld, stage, do_dx,
                     dxl, n_threads):
    # gy (N, G*Mg, P), and with relu the forward's output yr (same shape: grad_y is taken through
    # the fused ReLU as it is spread); x, dx (N, C, D, H, W) (dx zeroed, unused without do_dx);
    # wtpk (G, packed W[g].T), or with grad input gathered (dxl[0], see _Plan) the packed
    # (G, C/G x Mg*taps) weights of the transposed convolution;
    # zeroed per-thread partials: db (T, G*Mg) of the bias grad, and of the weight grad either
    # dwt (T, G, K~, Mg~) = dW[g].T from NR-wide tiles, or, when dwp (T, G, Mg/R, K/S, R*S*VL) is
    # not empty, per-lane sums of inner-product tiles (narrow layers). With stage > 1 (wide grid, one
    # band, inner-product tiles) each thread keeps the grids and grad_y of ``stage`` samples and
    # reduces the weight gradient over all of them per tile. With ``pooled``, gy and yr are the
    # gradient and output of a 2x2 stride-2 max pool of the conv's output (N, G*Mg, P/4) and pidx
    # its indices; nbad (T,) counts indices outside their window. dxl: _Plan.dx_layout
    gy, yr, x, wtpk, dx, dwt, dwp, db, ws = (borrowed(gy), borrowed(yr), borrowed(x), borrowed(wtpk), borrowed(dx),
                                             borrowed(dwt), borrowed(dwp), borrowed(db), borrowed(ws))
    pidx, nbad = borrowed(pidx), borrowed(nbad)
    boffs, arows, dyoffs, goffs = borrowed(boffs), borrowed(arows), borrowed(dyoffs), borrowed(goffs)
    n_samples = x.shape[0]
    n_groups = wtpk.shape[0]
    oh, ow = geo[13], geo[14]
    rows = geo[12] * oh
    mgp = dwt.shape[3]
    zero = gy.dtype.type(0)
    gather, lead, dld, first = dxl[0], dxl[1], dxl[2], dxl[3]
    ldc, ncol_dx, dxg_len, dcol_len = dxl[4], dxl[5], dxl[6], dxl[7]
    plane = grid[0] * grid[1] * grid[2]
    for t in prange(n_threads):
        buf = ws[t]
        xgs = buf[:stage * grid_len]  # the staged samples' grids
        o = stage * grid_len
        dxg = buf[o:o + dxg_len]  # grad input on the grid, folded into
        o += dxg_len
        col = buf[o:o + col_len]
        o += col_len
        dyl = lead + n_groups * mg * dld
        dyws = buf[o:o + stage * dyl]  # grad_y on the output grid, rows dld apart after lead, per staged sample
        o += stage * dyl
        dyt = buf[o:o + mgp * ld]  # one group's grad_y transposed into NR-channel panels
        o += mgp * ld
        dcol = buf[o:o + dcol_len]  # grad input columns
        o += dcol_len
        tile = buf[o:]
        dwt_t = dwt[t]
        dot = dwp.size > 0
        aoffs = np.empty(8, np.int64)  # rows, columns of an inner-product tile (DOT_SHAPES)
        toffs = np.empty(8, np.int64)
        win = np.empty(rt, np.int64)
        ocol = np.empty(rt, np.int64)
        xgs[:] = zero
        dxg[:] = zero
        if gather:  # the transposed convolution reads the zeros around each channel's grad_y
            dyws[:] = zero
        n_lo, n_hi = t * n_samples // n_threads, (t + 1) * n_samples // n_threads
        lpad, jb = 0, 0
        for n in range(n_lo, n_hi):
            s = (n - n_lo) % stage
            xg = xgs[s * grid_len:(s + 1) * grid_len]
            dyw = dyws[s * dyl + lead:(s + 1) * dyl]
            src = xg if mode == WIDE else col
            if mode != DIRECT_COLUMNS:
                _grid_copy(x[n], xg, geo, grid, True, plane)
            for band in range(n_bands):
                r0 = band * rt
                r1 = min(r0 + rt, rows)
                j0, jb, ncol = _fill_source(x[n], xg, col, mode, geo, grid, ogrid, goffs, r0, r1, ld, win, ocol)
                lpad = _round_up(ncol, NR)
                # the slot's rows hold this band's positions from its last sample (whole samples
                # only): its zeros are still there, as nothing but the spread writes them
                fresh = n_bands > 1 or n - n_lo < stage
                for co in range(n_groups * mg):
                    if pooled:
                        part, bad = _spread_pooled(dyw[co * dld:co * dld + lpad], gy[n, co], pidx[n, co],
                                                   yr[n, co], relu, ocol, r0, r1, ow)
                        db[t, co] += part
                        nbad[t] += bad
                    else:
                        db[t, co] += _spread_rows(dyw[co * dld:co * dld + lpad], gy[n, co, r0 * ow:r1 * ow],
                                                  yr[n, co, r0 * ow:r1 * ow], relu, ocol, r1 - r0, ow, fresh)
                for g in range(n_groups):
                    if dot and stage == 1:  # grad weight: dW[g] += dyw[g] @ cols.T, both read in place
                        _dot_tiles(g, 1, dyw, 0, src, 0, aoffs, toffs, dwp[t, g], mg, k, dld, gstride, jb, lpad,
                                   boffs)
                    elif not dot:  # grad weight: dW[g].T += cols (K x ncol, rows in place) @ dyw[g].T (packed here)
                        for q in range(mgp // NR):
                            _channel_panel(dyw, (g * mg + q * NR) * dld, dld, min(NR, mg - q * NR), ncol,
                                           dyt[q * ncol * NR:(q + 1) * ncol * NR])
                        tiles_a_rows(k, mg, ncol, src, g * gstride + jb, arows, dyt, dwt_t[g].reshape(-1), mgp,
                                     tile)
                    if do_dx and gather:
                        # grad input of the group's channels on the grid: the transposed convolution
                        # sum over (co, tap) of W[co, c, tap] * dyw[co, X - tap offset]
                        # (from the input's first column on, channels ldc apart), then out of the grid
                        cin = x.shape[1] // n_groups
                        tiles_b_rows(cin, ncol_dx, mg * (k // cin), wtpk[g], dyws[s * dyl:], g * mg * dld, dyoffs,
                                     dcol[first:], ldc, tile)
                        _grid_copy(dx[n, g * cin:(g + 1) * cin], dcol, geo, grid, False, ldc)
                    elif do_dx:
                        # grad input columns of the band: W[g].T @ dyw[g]
                        dc = dcol[g * k * ld:]
                        tiles_b_rows(k, ncol, mg, wtpk[g], dyw, g * mg * dld, dyoffs, dc, ld, tile)
                        if mode == WIDE:
                            for kk in range(k):
                                d0 = g * gstride + jb + boffs[kk]
                                dst = dxg[d0:d0 + ncol]
                                res = dc[kk * ld:kk * ld + ncol]
                                for e in range(ncol):
                                    dst[e] += res[e]
                if do_dx and mode == GRID_COLUMNS:
                    _columns(dxg, dcol, ld, goffs, r1 - r0, win, geo, True)
                elif do_dx and mode == DIRECT_COLUMNS:
                    n_rows = n_groups * k
                    scatter_rows(dx[n], dcol[:n_rows * ld].reshape((n_rows, ld)), 0, x.shape[1], r0, r1, geo)
            if do_dx and mode != DIRECT_COLUMNS and not gather:
                _grid_copy(dx[n], dxg, geo, grid, False, plane)
                dxg[:] = zero
            if dot and stage > 1 and (s == stage - 1 or n == n_hi - 1):  # the staged samples at once
                for g in range(n_groups):
                    _dot_tiles(g, s + 1, dyws[lead:], dyl, xgs, grid_len, aoffs, toffs, dwp[t, g], mg, k, dld,
                               gstride, jb, lpad, boffs)


for _kernel in (_band_rows, _grid_copy, _columns, _panel_columns, _fill_source, _pack_weights, _sum_span,
                _spread_rows, _spread_pooled,
                _dot_tiles,
                _forward_kernel, _backward_kernel):
    vectorized(_kernel)


# ---------------------------------------------------------------------------
# Planning and drivers (Python side: every shape was validated before this)


class _Plan:
    """Column source, band height and scratch layout of one conv call (see the module docstring)."""

    def __init__(self, x5_shape, w3_shape, geo, dtype, n_threads, backward, min_bands=1, dot=False, pooled=False):
        n, c = x5_shape[:2]
        n_groups, mg, k = w3_shape
        kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, od, oh, ow = geo
        self.rows = rows = od * oh
        positions = rows * ow
        self.mr = mr = _mr(dtype)
        # the zero-bordered input grid: every tap of every window, nothing past the last one
        grid = ((od - 1) * sd + (kd - 1) * dd + 1, (oh - 1) * sh + (kh - 1) * dh + 1,
                (ow - 1) * sw + (kw - 1) * dw + 1)
        plane = grid[0] * grid[1] * grid[2]
        grids = 2 if backward else 1
        grid_fits = ((c * plane + NR) * grids * dtype.itemsize * n_threads <= _MAX_WORKSPACE_BYTES
                     and _FORCE != "direct")
        wide = sd == sh == sw == 1 and grid_fits and _FORCE != "columns"
        # On the wide grid each row's right border is also the next row's left border (both
        # zeros): a window reaching past its row's end reads the next row's first columns.
        # Each output row then drops (kw-1)*dw - shared computed columns, not (kw-1)*dw:
        # 3x3 with padding 1 on 16x16 computes 17 columns per output row instead of 18.
        right = grid[2] - pw - x5_shape[4]  # border columns the windows reach past the input
        shared = max(0, min(pw, right, (kw - 1) * dw, NR)) if wide else 0
        if wide and _FORCE is None:
            n_wide = ((od - 1) * grid[1] + oh - 1) * (grid[2] - shared) + ow
            macs = n_groups * mg * k
            wide = (_round_up_py(n_wide, NR) * macs
                    <= _round_up_py(positions, NR) * macs + positions * n_groups * k * _IM2COL_COST)
        if wide:
            grid = (grid[0], grid[1], grid[2] - shared)
            plane = grid[0] * grid[1] * grid[2]
        else:
            shared = 0
        self.grid = grid
        self.mode = WIDE if wide else GRID_COLUMNS if grid_fits else DIRECT_COLUMNS
        self.ogrid = grid if wide else (od, oh, ow)
        # after the last row its shared border, then slack for tiles reading past the end
        self.grid_len = c * plane + shared + NR if self.mode != DIRECT_COLUMNS else 0
        mgp_rows, mgp_cols = _round_up_py(mg, mr), _round_up_py(mg, NR)
        taps = np.arange(kd * kh * kw)
        tap_off = ((taps // (kh * kw)) * dd * grid[1] * grid[2] + (taps // kw % kh) * dh * grid[2]
                   + (taps % kw) * dw)
        # Grad input gathered (wide grid, whole samples): the input's grid column X takes
        # sum over (co, tap) of W[co, c, tap] * dy[co, X - tap offset], dy zero off the outputs,
        # one product with the C/G input channels as rows and Mg x taps as the reduction,
        # instead of W.T @ dy (K rows of Mg) folded back onto the grid by K adds per column.
        cin_g = c // n_groups
        first = (pd * grid[1] + ph) * grid[2] + pw  # grid column of input (0, 0, 0)
        ncol_dx = ((x5_shape[2] - 1) * grid[1] + x5_shape[3] - 1) * grid[2] + x5_shape[4]
        ldx = _round_up_py(ncol_dx, NR)
        ldc = _round_up_py(first + ldx, 16)  # grad input rows: each channel's columns from X = first
        lead = _round_up_py(max(0, int(tap_off[-1]) - first), 16)
        gather = backward and wide
        if gather and _DX_GATHER is None:
            n_dy = ((od - 1) * grid[1] + oh - 1) * grid[2] + ow
            gather = (_round_up_py(cin_g, mr) * ldx * mg * len(taps)
                      <= _round_up_py(k, mr) * _round_up_py(n_dy, NR) * mg + k * n_dy * _FOLD_COST)
        elif gather:
            gather = _DX_GATHER

        def layout(rt, gather):
            ld = _round_up_py(max(self._band_width(r0, min(r0 + rt, rows), geo) for r0 in range(0, rows, rt)), NR)
            col_len = 0 if wide else n_groups * k * ld + NR
            if gather:  # channel rows of grad_y far enough apart that each is read among zeros
                dld = _round_up_py(max(ld + lead, first + ldx), 16)
                dyl, dxg_len, dcol_len = lead + n_groups * mg * dld, 0, _round_up_py(cin_g, mr) * ldc
            else:
                dld, dyl, dxg_len, dcol_len = ld, n_groups * mg * ld, self.grid_len, (n_groups * k + mr) * ld
            if backward:
                floats = self.grid_len + dxg_len + col_len + dyl + mgp_cols * ld + dcol_len + mr * NR
            else:
                floats = self.grid_len + col_len + mgp_rows * ld + mr * NR
            return ld, col_len, floats, (int(gather), lead if gather else 0, dld, first, ldc, ncol_dx, dxg_len,
                                         dcol_len)

        budget = min(_THREAD_BYTES, _MAX_WORKSPACE_BYTES // n_threads) // dtype.itemsize
        rt = rows
        if not backward and min_bands > 1:
            rt = -(-rows // min(rows, min_bands))
        ld, col_len, floats, dxl = layout(rt, gather)
        if gather and floats > budget:
            gather = False
            ld, col_len, floats, dxl = layout(rt, gather)
        while rt > 1 and floats > budget:
            rt = max(1, min(rt - 1, rt * budget // floats))
            ld, col_len, floats, dxl = layout(rt, gather)
        if pooled and rt < rows and rt % 2:  # a pool window's two rows stay in one band
            rt = max(2, rt - 1)
            ld, col_len, floats, dxl = layout(rt, gather)
        self.rt, self.n_bands = rt, -(-rows // rt)
        self.dx_gather = gather
        # (gathered, lead zeros before grad_y, its channel rows' stride, grid column of input
        # (0, 0, 0), grad input rows' stride, their width, grid and grad-input scratch lengths)
        self.dx_layout = np.array(dxl, np.int64)
        dld = dxl[2]
        # inner-product weight-gradient tiles on the wide grid of whole samples reduce over the
        # positions of one sample only (10 vectors for LeNet's second layer): staging several
        # samples' grids and grad_y lets each tile's partial sums be loaded and stored once for all
        self.stage = 1
        if backward and dot and wide and self.n_bands == 1:
            per_sample = self.grid_len + int(self.dx_layout[1]) + n_groups * mg * dld
            vectors = ld * dtype.itemsize // 64
            self.stage = int(max(1, min(_STAGE_VECTORS // vectors, -(-n // n_threads),
                                        1 + (budget - floats) // per_sample)))
            floats += (self.stage - 1) * per_sample
        self.ld, self.col_len, self.per_thread = ld, col_len, floats
        self.goffs = (np.arange(c)[:, None] * plane + tap_off[None, :]).reshape(-1).astype(np.int64)
        self.gstride = (c // n_groups) * plane if wide else k * ld
        self.boffs = self.goffs[:k].copy() if wide else (np.arange(k) * ld).astype(np.int64)
        self.arows = np.zeros(_round_up_py(k, mr), np.int64)
        self.arows[:k] = self.boffs
        if gather:  # B rows of the transposed convolution, (co, tap) in weight order
            self.dyoffs = (lead + first + np.arange(mg)[:, None] * dld - tap_off[None, :]).reshape(-1)
        else:
            self.dyoffs = np.arange(mg) * dld
        self.dyoffs = self.dyoffs.astype(np.int64)

    def _band_width(self, r0, r1, geo):
        oh, ow = geo[13], geo[14]
        hw, ww = self.ogrid[1], self.ogrid[2]

        def col(r):
            od = r // oh
            return (od * hw + r - od * oh) * ww

        return col(r1 - 1) + ow - col(r0)


def _round_up_py(a, b):
    return -(-a // b) * b


# Validated geometry and plans, by call signature: a training loop calls each
# layer with the same shapes every step, and re-deriving the plan in Python
# costs more than the kernel on small layers. Keys hold only plain arguments
# (_checks.plain), shapes and dtypes, so an entry is reused only for a call
# that validates identically.
_CALLS: dict = {}


def _call_key(arrays, params):
    """Hashable signature of a call, or None when an argument is not plain enough to cache."""
    if not all(plain(p) for p in params):
        return None
    # the tunables below are in the key too: tests change them to force each path
    sig = [get_num_threads(), _FORCE, _THREAD_BYTES, _MAX_WORKSPACE_BYTES, _IM2COL_COST, _DOT_PARTIAL_BYTES,
           _DOT_SHAPE, _STAGE_VECTORS, _FOLD_COST, _DX_GATHER, _WINOGRAD]
    for a in arrays:
        if a is None:
            sig.append(None)
        elif type(a) is np.ndarray:
            sig.append((a.shape, a.dtype))
        else:
            return None
    return tuple(sig) + tuple(params)


class _Call:
    """Everything a conv call derives from shapes and arguments: checked once per signature."""

    def __init__(self, nd, x, weight, bias, stride, padding, dilation, groups, op, backward, pooled=False):
        dtype, groups, kernel, (stride, pad_lo, _, dilation, out) = _check_conv(
            nd, x, weight, bias, stride, padding, dilation, groups, op)
        n, c_in = x.shape[:2]
        c_out = weight.shape[0]
        self.dtype = dtype
        self.x5_shape = (n, c_in) + lift3(x.shape[2:], 1)
        self.w3_shape = (groups, c_out // groups, weight.shape[1] * int(np.prod(kernel)))
        self.geo = make_geo(lift3(kernel, 1), lift3(stride, 1), lift3(pad_lo, 0), lift3(dilation, 1),
                            lift3(out, 1))
        self.n_threads = n_threads = get_num_threads()
        self.y_shape = (n, c_out) + tuple(out)
        if pooled and any(o < 2 for o in out):
            raise ValueError(f"{op}: a 2x2 max pool needs a conv output of at least 2 x 2, got {tuple(out)}")
        # what the forward returns and the backward's grad_y: the conv's output, or its 2x2 max pool
        self.result_shape = (n, c_out) + tuple(o // 2 for o in out) if pooled else self.y_shape
        self.plan = None
        self.dot = False
        self.wino = None
        if (nd == 2 and groups == 1 and kernel == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
                and n and c_out and _WINOGRAD is not False and _FORCE is None
                and (_WINOGRAD or winograd.worthwhile(c_in, c_out))):
            wino = winograd.Plan(n, c_in, c_out, pad_lo, out, dtype, n_threads, backward, _MAX_WORKSPACE_BYTES)
            if wino.fits:
                self.wino = wino
                return
        if backward:
            _, mg, k = self.w3_shape
            lanes = 64 // dtype.itemsize
            # the inner-product tile shape that pads (Mg, K) least (the first on ties)
            self.dot_shape = _DOT_SHAPE or min(
                DOT_SHAPES, key=lambda rs: _round_up_py(mg, rs[0]) * _round_up_py(k, rs[1]))
            r, s = self.dot_shape
            self.n_rt, self.n_st = -(-mg // r), -(-k // s)
            self.dot = self.n_rt * self.n_st * r * s * lanes * dtype.itemsize <= _DOT_PARTIAL_BYTES
        if n and c_out:
            self.plan = _Plan(self.x5_shape, self.w3_shape, self.geo, dtype, n_threads, backward,
                              min_bands=-(-n_threads // n), dot=self.dot, pooled=pooled)
        if backward:
            # the grid copy writes every element of grad_x unless windows stop short of the input
            # (strided) or the columns come straight from the input: then grad_x starts zeroed
            p = self.plan
            self.dx_covered = p is not None and (p.dx_gather or p.mode != DIRECT_COLUMNS and all(
                g - lo >= size for g, lo, size in zip(p.grid, self.geo[6:9], self.x5_shape[2:])))


def _packed_weights(w3, transpose, mr):
    n_groups, mg, k = w3.shape
    rows, cols = (k, mg) if transpose else (mg, k)
    wpk = np.empty((n_groups, _round_up_py(rows, mr) * cols), w3.dtype)
    _pack_weights(w3, wpk, transpose, mr)
    return wpk


# stands in for the pool's indices when there is no pool (never read)
_NO_INDICES = np.zeros((1, 1, 1), np.int64)


def _conv_forward(nd, x, weight, bias, stride, padding, dilation, groups, op, activation=None, max_pool=None):
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    if max_pool not in (None, 2) or isinstance(max_pool, bool):
        raise ValueError(f"{op}: max_pool must be None or 2 (a 2x2 stride-2 max pool), got {max_pool!r}")
    pooled = max_pool is not None
    key = _call_key((x, weight, bias), (nd, stride, padding, dilation, groups, "pool" if pooled else None))
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        call = remember(_CALLS, key, _Call(nd, x, weight, bias, stride, padding, dilation, groups, op, False, pooled))
    y = np.empty(call.result_shape, dtype=call.dtype)
    idx = np.empty(call.result_shape, np.int64) if pooled else _NO_INDICES
    plan = call.plan
    if y.size == 0:
        return (y, idx) if pooled else y
    if call.wino is not None:
        _winograd_forward(call, x, weight, bias, activation == "relu", pooled, y, idx)
        return (y, idx) if pooled else y
    x5 = np.ascontiguousarray(x).reshape(call.x5_shape)
    w3 = np.ascontiguousarray(weight).reshape(call.w3_shape)
    has_bias = bias is not None
    b = np.ascontiguousarray(bias) if has_bias else np.zeros(1, call.dtype)
    n_threads = call.n_threads
    ws = _workspace("forward", call.dtype, n_threads, plan.per_thread)
    wpk = _packed_weights(w3, False, plan.mr)
    n, c_out = y.shape[:2]
    _forward_kernel(x5, wpk, b, has_bias, activation == "relu", y.reshape((n, c_out, -1)), pooled,
                    idx.reshape((n, c_out, -1)) if pooled else idx, ws, plan.boffs, plan.goffs, call.geo,
                    plan.grid, plan.ogrid, plan.mode, plan.rt, plan.n_bands, call.w3_shape[1], call.w3_shape[2],
                    plan.gstride, plan.grid_len, plan.col_len, plan.ld, n_threads)
    return (y, idx) if pooled else y


@njit(cache=True, _nrt=False)
def _sum_partials(dwt, dwp, db, grad_w, grad_b):
    """Per-thread partials summed in a fixed thread order: ``grad_w`` (G, Mg, K), ``grad_b``.

    ``dwp`` (T, G, Mg/R, K/S, R*S*VL) holds per-lane inner-product sums when
    it is not empty, else ``dwt`` (T, G, K~, Mg~) holds dW[g].T.
    """
    n_threads, n_groups = db.shape[0], grad_w.shape[0]
    mg, k = grad_w.shape[1], grad_w.shape[2]
    zero = grad_w.dtype.type(0)
    if dwp.size > 0:
        tr, ts = _dot_shape(dwp, _lanes(dwp))
        vl = _lanes(dwp)
        grad_w[:] = zero
        for t in range(n_threads):  # tile by tile: each partial is read once, in order
            for g in range(n_groups):
                for i in range(dwp.shape[2]):
                    for j in range(dwp.shape[3]):
                        part = dwp[t, g, i, j]
                        for r in range(min(tr, mg - i * tr)):
                            for s in range(min(ts, k - j * ts)):
                                grad_w[g, i * tr + r, j * ts + s] += _sum_span(
                                    part[(r * ts + s) * vl:(r * ts + s + 1) * vl])
    else:
        for g in range(n_groups):
            for co in range(mg):
                for kk in range(k):
                    acc = zero
                    for t in range(n_threads):
                        acc += dwt[t, g, kk, co]
                    grad_w[g, co, kk] = acc
    for c in range(grad_b.size):
        acc = zero
        for t in range(n_threads):
            acc += db[t, c]
        grad_b[c] = acc


def _conv_backward(nd, grad_y, x, weight, stride, padding, dilation, groups, bias_grad, op, input_grad=True,
                   activation=None, output=None, pool_indices=None):
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    if (activation is None) != (output is None):
        raise ValueError(f"{op}: activation='relu' needs the forward's output, and output needs activation='relu'")
    pooled = pool_indices is not None
    key = _call_key((grad_y, x, weight), (nd, stride, padding, dilation, groups, "pool" if pooled else None))
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        call = _Call(nd, x, weight, None, stride, padding, dilation, groups, op, True, pooled)
        check_array(grad_y, "grad_y", nd + 2)
        check_same_dtype(grad_y=grad_y, x=x, weight=weight)
        if grad_y.shape != call.result_shape:
            what = "the 2x2 max pool of the output" if pooled else "the output"
            raise ValueError(f"{op}: grad_y has shape {grad_y.shape}, the shape of {what} is {call.result_shape}")
        remember(_CALLS, key, call)
    if output is not None:
        check_array(output, "output", nd + 2)
        check_same_dtype(grad_y=grad_y, output=output)
        if output.shape != call.result_shape:
            what = "pooled output" if pooled else "forward's output"
            raise ValueError(f"{op}: output has shape {output.shape}, the {what} shape is {call.result_shape}")
    if pooled:
        if not isinstance(pool_indices, np.ndarray) or pool_indices.dtype != np.int64:
            raise TypeError(f"{op}: pool_indices must be an int64 numpy.ndarray, "
                            f"got {getattr(pool_indices, 'dtype', type(pool_indices).__name__)}")
        if pool_indices.shape != call.result_shape:
            raise ValueError(f"{op}: pool_indices has shape {pool_indices.shape}, grad_y has {call.result_shape}")
    if call.wino is not None:
        return _winograd_backward(call, grad_y, x, weight, bias_grad, input_grad, output, pool_indices, op)
    dtype, plan = call.dtype, call.plan
    n = x.shape[0]
    n_groups, mg, k = call.w3_shape
    n_threads = call.n_threads
    # grad_x is skipped (and None) for a layer fed by data: the first layer of a model
    dx = (np.empty if call.dx_covered else np.zeros)(x.shape if input_grad else (0,) * x.ndim, dtype=dtype)
    mr = _mr(dtype)
    lanes = 64 // dtype.itemsize
    dot, n_rt, n_st = call.dot, call.n_rt, call.n_st
    dwt = np.zeros((n_threads, n_groups) + ((0, 0) if dot else (_round_up_py(k, mr), _round_up_py(mg, NR))), dtype)
    dwp = np.zeros((n_threads, n_groups) + ((n_rt, n_st, call.dot_shape[0] * call.dot_shape[1] * lanes) if dot
                                            else (0, 0, 0)), dtype)
    db = np.zeros((n_threads, n_groups * mg), dtype)
    if plan is not None and grad_y.size:
        x5 = np.ascontiguousarray(x).reshape(call.x5_shape)
        w3 = np.ascontiguousarray(weight).reshape(call.w3_shape)
        gy = np.ascontiguousarray(grad_y).reshape((n, n_groups * mg, -1))
        yr = gy if output is None else np.ascontiguousarray(output).reshape(gy.shape)
        pidx = np.ascontiguousarray(pool_indices).reshape(gy.shape) if pooled else _NO_INDICES
        ws = _workspace("backward", dtype, n_threads, plan.per_thread)
        if plan.dx_gather:  # the transposed convolution's weights: (G, C/G, Mg x taps)
            c_g = call.x5_shape[1] // n_groups
            wdx = w3.reshape(n_groups, mg, c_g, k // c_g).transpose(0, 2, 1, 3).reshape(n_groups, c_g, -1)
            wtpk = _packed_weights(np.ascontiguousarray(wdx), False, mr)
        else:
            wtpk = _packed_weights(w3, True, mr)
        dx5 = dx.reshape(call.x5_shape if input_grad else (0,) * 5)
        nbad = np.zeros(n_threads, np.int64)
        _backward_kernel(gy, yr, output is not None, pidx, pooled, nbad, x5, wtpk, dx5, dwt, dwp, db, ws,
                         plan.boffs, plan.arows, plan.dyoffs, plan.goffs, call.geo, plan.grid, plan.ogrid,
                         plan.mode, plan.rt, plan.n_bands, mg, k, plan.gstride, plan.grid_len, plan.col_len,
                         plan.ld, plan.stage, input_grad, plan.dx_layout, n_threads)
        if nbad.any():
            raise _bad_indices(op, nbad, pool_indices)
    grad_w = np.empty(call.w3_shape, dtype)
    grad_b = np.empty(n_groups * mg, dtype)
    _sum_partials(dwt, dwp, db, grad_w, grad_b)
    return (dx if input_grad else None), grad_w.reshape(weight.shape), (grad_b if bias_grad else None)


def _bad_indices(op, nbad, pool_indices):
    return ValueError(f"{op}: {int(nbad.sum())} of pool_indices' {pool_indices.size} entries are outside "
                      f"their 2x2 window; pass the indices max_pool2d returned for this conv's output")


def _winograd_forward(call, x, weight, bias, relu, pooled, y, idx):
    """conv2d by F(4x4, 3x3) (winograd.py) into ``y`` (and ``idx``, the pool's, with ``pooled``)."""
    p, dtype, n_threads = call.wino, call.dtype, call.n_threads
    n, c_out = call.y_shape[:2]
    b = np.zeros(p.cop, dtype)
    if bias is not None:
        b[:c_out] = bias
    ut = np.empty((winograd.POSITIONS, p.cop // NR, weight.shape[1], NR), dtype)
    winograd._weight_panels(winograd._weight_lanes(weight, True), ut, n_threads)
    ws = _workspace("winograd", dtype, n_threads, p.per_thread)
    iws = _workspace("winograd", np.int64, n_threads, p.index_len if pooled else 1)
    pidx = idx.reshape((n, c_out, -1)) if pooled else _NO_INDICES
    winograd._forward_kernel(np.ascontiguousarray(x), ut, b, relu, pooled, y.reshape((n, c_out, -1)), pidx, ws, iws,
                            p.geo, n_threads)


def _winograd_backward(call, grad_y, x, weight, bias_grad, input_grad, output, pool_indices, op):
    """Gradients of :func:`_winograd_forward`, as :func:`_conv_backward` returns them."""
    p, dtype, n_threads = call.wino, call.dtype, call.n_threads
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    pooled = pool_indices is not None
    u = np.empty((winograd.POSITIONS, p.cip // NR, c_out, NR) if input_grad else (winograd.POSITIONS, 1, 1, NR), dtype)
    if input_grad:
        winograd._weight_panels(winograd._weight_lanes(weight, False), u, n_threads)
    dx = np.empty(x.shape if input_grad else (0,) * 4, dtype)  # every element is written
    du = np.zeros((n_threads, winograd.POSITIONS, p.coutr, p.cip), dtype)
    db = np.zeros((n_threads, p.cop), dtype)
    nbad = np.zeros(n_threads, np.int64)
    gy = np.ascontiguousarray(grad_y).reshape((n, c_out, -1))
    yr = gy if output is None else np.ascontiguousarray(output).reshape(gy.shape)
    pidx = np.ascontiguousarray(pool_indices).reshape(gy.shape) if pooled else _NO_INDICES
    ws = _workspace("winograd backward", dtype, n_threads, p.per_thread)
    iws = _workspace("winograd", np.int64, n_threads, p.index_len if pooled else 1)
    winograd._backward_kernel(gy, yr, output is not None, pooled, pidx, np.ascontiguousarray(x), u, dx,
                             input_grad, du, db, nbad, ws, iws, p.voffs, p.geo, n_threads)
    if nbad.any():
        raise _bad_indices(op, nbad, pool_indices)
    grad_w = np.empty(weight.shape, dtype)
    winograd._weight_gradient(du, grad_w, n_threads)
    return (dx if input_grad else None), grad_w, (db.sum(axis=0)[:c_out] if bias_grad else None)


# ---------------------------------------------------------------------------
# Validation


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


# ---------------------------------------------------------------------------
# Public API

_ARGS_DOC = """
    ``stride`` and ``dilation`` are ints or tuples (one per spatial dim, > 0);
    ``padding`` is an int or tuple (>= 0), 'valid' (no padding) or 'same'
    (output size = input size; stride 1 only; when ``dilation * (k - 1)`` is odd
    the extra zero goes after the input, as in torch). ``groups`` splits the
    channels into independent convolutions (``groups == C_in`` is depthwise).
    Arrays are float32 or float64, all of one dtype. The forward also takes
    ``activation='relu'`` (keyword only, not in torch): ``relu(conv + bias)`` in
    the same pass over the output; its backward is :func:`fastkern.bias_relu_backward`
    on the result, then the conv backward with ``bias_grad=False``.
"""


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """1-D convolution (cross-correlation) as ``torch.nn.functional.conv1d``.

    ``x`` is (N, C_in, L), ``weight`` (C_out, C_in / groups, kL), ``bias``
    (C_out,) or None. Returns a new (N, C_out, L_out) array.
    """
    return _conv_forward(1, x, weight, bias, stride, padding, dilation, groups, "conv1d", activation)


def conv1d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True, *, activation=None, output=None):
    """Gradients of :func:`conv1d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False, and ``grad_x`` is None (and not computed) when
    ``input_grad`` is False, as for a model's first layer. For a forward run
    with ``activation="relu"``, pass the same ``activation`` and that call's
    ``output``: ``grad_y`` is then the gradient w.r.t. the ReLU's output and
    is masked by ``output > 0`` in the kernel's own pass over it. Arguments as in :func:`conv1d`.
    """
    return _conv_backward(1, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv1d_backward", input_grad, activation, output)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None, max_pool=None):
    """2-D convolution (cross-correlation) as ``torch.nn.functional.conv2d``.

    ``x`` is (N, C_in, H, W), ``weight`` (C_out, C_in / groups, kH, kW),
    ``bias`` (C_out,) or None. Returns a new (N, C_out, H_out, W_out) array.

    With ``max_pool=2``, returns ``(pooled, indices)``, what
    ``max_pool2d(conv2d(...), 2, return_indices=True)`` returns (after the ReLU with
    ``activation="relu"``), computed in the conv's own epilogue: the full-size output is
    never written. :func:`conv2d_backward` with ``pool_indices`` is its gradient.
    """
    return _conv_forward(2, x, weight, bias, stride, padding, dilation, groups, "conv2d", activation, max_pool)


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True, *, activation=None, output=None, pool_indices=None):
    """Gradients of :func:`conv2d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False, and ``grad_x`` is None (and not computed) when
    ``input_grad`` is False, as for a model's first layer. For a forward run
    with ``activation="relu"``, pass the same ``activation`` and that call's
    ``output``: ``grad_y`` is then the gradient w.r.t. the ReLU's output and
    is masked by ``output > 0`` in the kernel's own pass over it. Arguments as in :func:`conv2d`.

    When a 2x2 stride-2 max pool followed the conv (or its ReLU), pass that pool's
    ``indices`` as ``pool_indices``: ``grad_y`` is then the gradient w.r.t. the pool's
    output, and ``output`` (with ``activation="relu"``) the pool's output. The kernel routes
    each window's gradient to its maximum as it reads grad_y, so no full-size gradient of
    the conv output is made (the same result as ``max_pool2d_backward`` first).
    """
    return _conv_backward(2, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv2d_backward", input_grad, activation, output, pool_indices)


def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """3-D convolution (cross-correlation) as ``torch.nn.functional.conv3d``.

    ``x`` is (N, C_in, D, H, W), ``weight`` (C_out, C_in / groups, kD, kH, kW),
    ``bias`` (C_out,) or None. Returns a new (N, C_out, D_out, H_out, W_out) array.
    """
    return _conv_forward(3, x, weight, bias, stride, padding, dilation, groups, "conv3d", activation)


def conv3d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1, bias_grad=True,
                    input_grad=True, *, activation=None, output=None):
    """Gradients of :func:`conv3d`: ``(grad_x, grad_weight, grad_bias)``.

    ``grad_y`` has the forward output's shape; ``grad_bias`` is None when
    ``bias_grad`` is False, and ``grad_x`` is None (and not computed) when
    ``input_grad`` is False, as for a model's first layer. For a forward run
    with ``activation="relu"``, pass the same ``activation`` and that call's
    ``output``: ``grad_y`` is then the gradient w.r.t. the ReLU's output and
    is masked by ``output > 0`` in the kernel's own pass over it. Arguments as in :func:`conv3d`.
    """
    return _conv_backward(3, grad_y, x, weight, stride, padding, dilation, groups, bias_grad,
                          "conv3d_backward", input_grad, activation, output)


for _f in (conv1d, conv2d, conv3d, conv1d_backward, conv2d_backward, conv3d_backward):
    _f.__doc__ += _ARGS_DOC


def _warmup(dtype):
    """Compile the conv kernels for ``dtype`` (the 3-D kernels serve 1-D and 2-D too): both
    sources, the wide grid (stride 1) and explicit columns (stride 2), forward and backward, and
    Winograd's (3x3 stride 1, enough channels)."""
    x = np.ones((1, 4, 6, 6), dtype)
    w = np.ones((2, 2, 3, 3), dtype)
    for stride in (1, 2):
        y = conv2d(x, w, np.ones(2, dtype), stride=stride, padding=1, groups=2)
        conv2d_backward(np.ones_like(y), x, w, stride=stride, padding=1, groups=2)
    c = NR
    x, w = np.ones((1, c, 4, 4), dtype), np.ones((c, c, 3, 3), dtype)
    y = conv2d(x, w, padding=1)
    conv2d_backward(np.ones_like(y), x, w, padding=1)

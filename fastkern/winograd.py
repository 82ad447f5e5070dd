"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3), forward and backward.

A 3x3 kernel on a 4x4 tile of outputs needs the tile's 6x6 input window ``d``:

    Y = A^T [ (G g G^T) . (B^T d B) ] A        (``.`` elementwise, 36 products)

against 144 multiply-adds computed directly. Over all channels the 36
elementwise products are 36 GEMMs, one per position xi of the 6x6 transform:

* forward:     ``M[xi] = V[xi] @ U[xi].T``    (tiles x C_in) @ (C_in x C_out)
* grad weight: ``dU[xi] += dM[xi].T @ V[xi]``, with ``dM = A dY A^T`` per tile
* grad input:  ``dV[xi] = dM[xi] @ U[xi]``, then ``B dV B^T`` added back
  onto the input (tiles overlap by two rows and columns)

with ``U = G g G^T`` (once per call) and ``V = B^T d B`` per tile.
That is 4x fewer multiply-adds than the im2col GEMMs of conv.py, for
transforms that cost O(channels x tiles), and channels padded to whole
NR-wide panels (``worthwhile``). F(2x2, 3x3) (16 GEMMs, 2.25x fewer) was
this module's first form: its transforms were cheaper per tile, but it had
four times the tiles, and at 32 x 64 and 64 x 128 channels F(4x4, 3x3) takes
0.65-0.79x its forward + backward time. Its transforms' constants (up to 8,
and 1/24 in G) cost float32 some accuracy: errors up to 3e-6 of the largest
output or gradient, against up to 3e-7 by im2col (3 to 33 channels).

Each thread works on whole samples, a chunk of them at a time: their tiles
side by side as the GEMMs' columns, enough for full NR-wide tiles of the
micro-kernel (``_TARGET_TILES``) while V, M and dM stay in L2; a sample too
large for that runs in bands of tile rows (``Plan``). The forward
hands chunks out from a shared counter; the backward gives each thread a
fixed share of the samples and its own partial dU, summed in thread order,
so results are deterministic for a given thread count. Each 4x4 output tile
holds four whole windows of a 2x2 stride-2 max pool, so the pool (and the
ReLU) are fused into the forward's output transform and into the backward's
reading of grad_y, as in conv.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._codegen import FMA, vectorized, zeros
from .gemm import NR, _cdiv, _claim, _lanes, _micro_kernel, _stack_array, _tile_rows, _transpose_lanes

# Both channel counts are padded to NR in the GEMMs, so Winograd's 36/144 of the multiply-adds
# become 36/144 * padded(C_in) * padded(C_out) / (C_in * C_out). Against the im2col path
# (float32 f+b, 64 samples, 16 x 16 maps, interleaved): 32 x 16 channels 0.70x the time, 16 x 64
# 0.82x, 16 x 32 0.83-0.98x (0.995x on 32 x 32 maps), all a padding of 2; 16 x 16 1.21x and a
# 3-channel first layer 3.1x, where the transforms of mostly padding dominate.
MAX_PADDING = 2.0


def worthwhile(c_in, c_out):
    """Whether a 3x3 stride-1 conv with these channel counts is faster by Winograd than im2col."""
    return _round_up(c_in, NR) * _round_up(c_out, NR) <= MAX_PADDING * c_in * c_out


# Tiles per chunk that the GEMMs aim for (their M: whole MR-row micro-kernel tiles), within
# _CHUNK_BYTES of V, M, dM and dV per thread (L2 is 1 MiB/core).
_TARGET_TILES = 128
_CHUNK_BYTES = 1 << 20


# F(4x4, 3x3)'s matrices (Lavin and Gray), applied as the small sums below:
#   B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
#          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
#   G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]]
#   A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
# Every constant is made in the arrays' dtype: a float64 literal would widen float32 arithmetic.
TILE = 4  # outputs per tile side
WINDOW = TILE + 2  # inputs per window side
POSITIONS = WINDOW * WINDOW  # GEMMs per chunk


@njit(inline="always")
def _consts(x):
    """(2, 4, 5, 8, 1/4, 1/6, 1/12, 1/24) in the dtype of array x."""
    t = x.dtype.type
    return t(2), t(4), t(5), t(8), t(0.25), t(1 / 6), t(1 / 12), t(1 / 24)


@njit(inline="always")
def _g_of(a, b, c, k):
    """G (a, b, c)."""
    q, s, tw, tf = k[4], k[5], k[6], k[7]
    return a * q, -(a + b + c) * s, (b - a - c) * s, a * tf + b * tw + c * s, a * tf - b * tw + c * s, c


@njit(inline="always")
def _gt_of(six, k):
    """G^T (a0 .. a5)."""
    a0, a1, a2, a3, a4, a5 = six
    q, s, tw, tf = k[4], k[5], k[6], k[7]
    s12, s34 = a1 + a2, a3 + a4
    return a0 * q - s12 * s + s34 * tf, (a2 - a1) * s + (a3 - a4) * tw, (s34 - s12) * s + a5


@njit(inline="always")
def _bt_of(six, k):
    """B^T (d0 .. d5)."""
    d0, d1, d2, d3, d4, d5 = six
    two, four, five = k[0], k[1], k[2]
    return (four * d0 - five * d2 + d4, (d3 + d4) - four * (d1 + d2), (d4 - d3) + four * (d1 - d2),
            (d4 - d2) + two * (d3 - d1), (d4 - d2) - two * (d3 - d1), four * d1 - five * d3 + d5)


@njit(inline="always")
def _b_of(six, k):
    """B (v0 .. v5), the adjoint of _bt_of."""
    v0, v1, v2, v3, v4, v5 = six
    two, four, five = k[0], k[1], k[2]
    return (four * v0, four * (v2 - v1 + v5) + two * (v4 - v3), -five * v0 - four * (v1 + v2) - (v3 + v4),
            (v1 - v2) + two * (v3 - v4) - five * v5, v0 + v1 + v2 + v3 + v4, v5)


@njit(inline="always")
def _at_of(six, k):
    """A^T (m0 .. m5)."""
    m0, m1, m2, m3, m4, m5 = six
    two, four, eight = k[0], k[1], k[3]
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + s12 + s34, d12 + two * d34, s12 + four * s34, d12 + eight * d34 + m5


@njit(inline="always")
def _a_of(y0, y1, y2, y3, k):
    """A (y0 .. y3), the adjoint of _at_of."""
    two, four = k[0], k[1]
    s02, s13, far = y0 + y2, y1 + y3, y0 + four * y2
    near = two * (y1 + four * y3)
    return y0, s02 + s13, s02 - s13, far + near, far - near, y3


# The planes of U and dU are a multiple of 4 KiB apart: touching all of them for one kernel puts
# them in one L1 set, where they evict each other (70 ns a kernel). Both loops below take a vector
# of kernels at a time instead, one whole cache line per plane.


def _weight_lanes(w, by_out):
    """The kernels of w (C_out, C_in, 3, 3) as (9, rows, lanes~) for _weight_panels, lanes zero
    padded to whole NR panels: (9, C_in, C_out~) with ``by_out``, else (9, C_out, C_in~). Lanes
    then sit side by side, so the transform reads whole vectors (from w itself, each lane was a
    gather, and the transform ran scalar: 170 us at 64 x 128 channels)."""
    cout, cin = w.shape[:2]
    g = w.reshape(cout, cin, 9).transpose(2, 1, 0) if by_out else w.reshape(cout, cin, 9).transpose(2, 0, 1)
    wl = np.zeros(g.shape[:2] + (-(-g.shape[2] // NR) * NR,), w.dtype)
    wl[:, :, :g.shape[2]] = g
    return wl


@njit(parallel=True, cache=True)
def _weight_panels(wl, panels, n_threads):
    """``U[xi] = (G g G^T)[xi]`` of each kernel g (3x3, from ``_weight_lanes``) into the micro-kernel's
    packed B, NR-column panels: U[xi].T (C_in x C_out) for the forward, panels (36, C_out~/NR,
    C_in, NR), or U[xi] (C_out x C_in) for grad input, (36, C_in~/NR, C_out, NR). The threads
    share the rows: on one, the transform took 110 us of a 2.5 ms forward at 64 x 128 channels."""
    n_rows = wl.shape[1]
    for t in prange(n_threads):
        _weight_panel_rows(wl, panels, t * n_rows // n_threads, (t + 1) * n_rows // n_threads)


@njit(cache=True, _nrt=False)
def _weight_panel_rows(wl, panels, row0, row1):
    """Rows [row0, row1) of _weight_panels."""
    vl = _lanes(wl)
    k = _consts(wl)
    n_rows, n_lanes = wl.shape[1], wl.shape[2]
    flat, out = wl.reshape(-1), panels.reshape(-1)
    u = _VECTORS36(wl)
    plane, kstep = panels.size // POSITIONS, n_rows * n_lanes
    for row in range(row0, row1):
        for l0 in range(0, n_lanes, vl):
            s = row * n_lanes + l0
            for e in range(vl):
                g9 = _nine(flat, s + e, kstep)
                r0 = _g_of(g9[0], g9[3], g9[6], k)  # G g, by columns of g
                r1 = _g_of(g9[1], g9[4], g9[7], k)
                r2 = _g_of(g9[2], g9[5], g9[8], k)
                for r in range(WINDOW):
                    g = _g_of(r0[r], r1[r], r2[r], k)  # (G g) G^T, row r
                    for q in range(WINDOW):
                        u[(WINDOW * r + q) * vl + e] = g[q]
            o = ((l0 // NR) * n_rows + row) * NR + l0 % NR
            for x in range(POSITIONS):
                for e in range(vl):
                    out[_u(x * plane + o + e)] = u[x * vl + e]


@njit(inline="always")
def _nine(flat, i, step):
    """flat[i], flat[i + step], .. flat[i + 8*step]."""
    return (flat[_u(i)], flat[_u(i + step)], flat[_u(i + 2 * step)], flat[_u(i + 3 * step)], flat[_u(i + 4 * step)],
            flat[_u(i + 5 * step)], flat[_u(i + 6 * step)], flat[_u(i + 7 * step)], flat[_u(i + 8 * step)])


@njit(parallel=True, cache=True)
def _weight_gradient(du, grad_w, n_threads):
    """``grad_w[co, ci] = G^T dU G`` (3x3) with dU[xi] (36) the sum of the threads' partials
    du (T, 36, C_out~, C_in~), added in thread order. The threads take output channels in turn."""
    cout = grad_w.shape[0]
    for t in prange(n_threads):
        _weight_gradient_rows(du, grad_w, t * cout // n_threads, (t + 1) * cout // n_threads)


@njit(cache=True, _nrt=False)
def _weight_gradient_rows(du, grad_w, co0, co1):
    """Output channels [co0, co1) of _weight_gradient."""
    vl = _lanes(du)
    k = _consts(du)
    cin = grad_w.shape[1]
    d = _VECTORS36(grad_w)  # dU of a vector of kernels
    res = _VECTORS36(grad_w)  # their gradients, 9 vectors
    flat, out = du.reshape(-1), grad_w.reshape(-1)
    plane = du.shape[2] * du.shape[3]
    for co in range(co0, co1):
        for c0 in range(0, cin, vl):  # rows of du hold C_in~ >= c0 + vl entries
            s = co * du.shape[3] + c0
            for x in range(POSITIONS):
                for e in range(vl):
                    d[x * vl + e] = flat[_u(x * plane + s + e)]
                for t in range(1, du.shape[0]):
                    for e in range(vl):
                        d[x * vl + e] += flat[_u((t * POSITIONS + x) * plane + s + e)]
            for e in range(vl):  # every lane (those past C_in are not stored): it vectorizes
                c_0 = _gt_of(_six(d, 0, WINDOW, vl, e), k)  # G^T dU, by columns
                c_1 = _gt_of(_six(d, 1, WINDOW, vl, e), k)
                c_2 = _gt_of(_six(d, 2, WINDOW, vl, e), k)
                c_3 = _gt_of(_six(d, 3, WINDOW, vl, e), k)
                c_4 = _gt_of(_six(d, 4, WINDOW, vl, e), k)
                c_5 = _gt_of(_six(d, 5, WINDOW, vl, e), k)
                for r in range(3):
                    row = _gt_of((c_0[r], c_1[r], c_2[r], c_3[r], c_4[r], c_5[r]), k)  # (G^T dU) G, row r
                    for q in range(3):
                        res[(3 * r + q) * vl + e] = row[q]
            for e in range(min(vl, cin - c0)):
                o = (co * cin + c0 + e) * 9
                for x in range(9):
                    out[_u(o + x)] = res[x * vl + e]


# ---------------------------------------------------------------------------
# Layouts. Channels are innermost everywhere: the zero-bordered grid of a sample
# (Hg, Wg, C~), V and dV (36, tiles~, C_in~), M and dM (36, tiles~, C_out~), with
# C~ rounded up to NR and tiles~ to MR. Each tile's transform then runs on whole
# vectors of channels (staged in stack arrays, so LLVM knows nothing aliases),
# and the GEMMs read rows of tiles as A in place: the micro-kernel's strided-A
# case, with the transformed weights packed as B once per call. Each transform
# is two passes of a 6-point (or 4-point) sum, down the columns of the tile and
# then along its rows, one lane of channels at a time.

_VECTORS36 = _stack_array(lambda dt: POSITIONS * 512 // dt.bitwidth)
_VECTORS16 = _stack_array(lambda dt: TILE * TILE * 512 // dt.bitwidth)


@njit(inline="always")
def _u(i):
    """An offset as unsigned: indexing then needs no wraparound select, which keeps loops vectorizable."""
    return np.uintp(i)


@njit(inline="always")
def _six(a, x0, step, vl, e):
    """Lane e of the six vectors x0, x0 + step, .. of stack array a."""
    return (a[x0 * vl + e], a[(x0 + step) * vl + e], a[(x0 + 2 * step) * vl + e], a[(x0 + 3 * step) * vl + e],
            a[(x0 + 4 * step) * vl + e], a[(x0 + 5 * step) * vl + e])


@njit(cache=True, _nrt=False)
def _input_transform(xg, wg, cp, i0, i1, tw, v, vbase, plane):
    """V[xi, t, :] = (B^T d B)[xi] (at ``vbase + xi*plane + t*cp``) for tile t = (i - i0)*tw + j of
    tile rows [i0, i1), whose window d is rows 4i.. and columns 4j.. of the grid ``xg`` (Hg, wg, cp)."""
    vl = _lanes(xg)
    k = _consts(xg)
    d = _VECTORS36(xg)
    for i in range(i0, i1):
        for j in range(tw):
            s = (TILE * i * wg + TILE * j) * cp
            t = vbase + ((i - i0) * tw + j) * cp
            for c0 in range(0, cp, vl):
                for r in range(WINDOW):
                    for q in range(WINDOW):
                        src = s + (r * wg + q) * cp + c0
                        for e in range(vl):
                            d[(WINDOW * r + q) * vl + e] = xg[_u(src + e)]
                for e in range(vl):
                    for q in range(WINDOW):  # B^T d, down column q
                        y = _bt_of(_six(d, q, WINDOW, vl, e), k)
                        for r in range(WINDOW):
                            d[(WINDOW * r + q) * vl + e] = y[r]
                    for r in range(WINDOW):  # (B^T d) B, along row r
                        y = _bt_of(_six(d, WINDOW * r, 1, vl, e), k)
                        for q in range(WINDOW):
                            d[(WINDOW * r + q) * vl + e] = y[q]
                for x in range(POSITIONS):
                    dst = t + x * plane + c0
                    for e in range(vl):
                        v[_u(dst + e)] = d[x * vl + e]


@njit(cache=True, _nrt=False)
def _transpose(src, soff, sld, rows, cols, dst, doff, dld):
    """``dst[doff + c*dld + r] = src[soff + r*sld + c]`` for r < rows, c < cols: lanes x lanes
    blocks in registers where whole, element by element at the edges."""
    vl = _lanes(src)
    r1, c1 = rows - rows % vl, cols - cols % vl
    for r0 in range(0, r1, vl):
        for c0 in range(0, c1, vl):
            _transpose_lanes(src, soff + r0 * sld + c0, sld, dst, doff + c0 * dld + r0, dld)
    for r in range(rows):
        for c in range(c1 if r < r1 else 0, cols):
            dst[doff + c * dld + r] = src[soff + r * sld + c]


@njit(inline="always")
def _pool_window(i, j, wnd, ph_, pw_, ow):
    """Pool window wnd (of the 2x2) of output tile (i, j): whether it is whole (inside the pooled map,
    (ph_, pw_)), its position in that map, its top-left output's slot in the tile (of 16) and
    that output's index in the map, h*ow + w."""
    wi, wj = wnd // 2, wnd % 2
    pi, pj = (TILE // 2) * i + wi, (TILE // 2) * j + wj
    return pi < ph_ and pj < pw_, pi * pw_ + pj, 2 * (TILE * wi + wj), 2 * (pi * ow + pj)


@njit(cache=True, _nrt=False)
def _output_transform(m, mbase, plane, cp, i0, i1, tw, oh, ow, bias, relu, pooled, yt, it):
    """Output tiles of tile rows [i0, i1) of one sample from M (tile t's at ``mbase + xi*plane + t*cp``,
    t = (i - i0)*tw + j), channels last:
    yt (oh*ow, cp) with bias and ReLU, or with ``pooled`` the 2x2 max pool of that, yt and its
    indices it ((oh//2)*(ow//2), cp), with torch's winner (the first of ties, a NaN wins) and
    index h*ow + w. ``bias`` has cp entries."""
    vl = _lanes(m)
    k = _consts(m)
    a = _VECTORS36(m)
    y = _VECTORS16(m)
    zero = m.dtype.type(0)
    ph_, pw_ = oh // 2, ow // 2
    half = TILE // 2
    for i in range(i0, i1):
        for j in range(tw):
            t = mbase + ((i - i0) * tw + j) * cp
            o = TILE * (i * ow + j)
            if pooled and not (half * i < ph_ and half * j < pw_):
                continue
            for c0 in range(0, cp, vl):
                for x in range(POSITIONS):
                    src = t + x * plane + c0
                    for e in range(vl):
                        a[x * vl + e] = m[_u(src + e)]
                for e in range(vl):  # A^T M A, plus bias, through the ReLU (NaN kept)
                    for q in range(WINDOW):  # A^T M, down column q
                        r4 = _at_of(_six(a, q, WINDOW, vl, e), k)
                        for r in range(TILE):
                            a[(WINDOW * r + q) * vl + e] = r4[r]
                    b = bias[c0 + e]
                    for r in range(TILE):
                        r4 = _at_of(_six(a, WINDOW * r, 1, vl, e), k)
                        for q in range(TILE):
                            yv = r4[q] + b
                            if relu:
                                yv = zero if yv < zero else yv
                            y[(TILE * r + q) * vl + e] = yv
                for wnd in range(4 if pooled else 0):
                    whole, pooled_at, x0, ow0 = _pool_window(i, j, wnd, ph_, pw_, ow)
                    if not whole:
                        continue
                    dst = pooled_at * cp + c0
                    for e in range(vl):
                        best, off = y[x0 * vl + e], ow0
                        q01, q10, q11 = y[(x0 + 1) * vl + e], y[(x0 + TILE) * vl + e], \
                            y[(x0 + TILE + 1) * vl + e]
                        if q01 > best or q01 != q01:
                            best, off = q01, ow0 + 1
                        if q10 > best or q10 != q10:
                            best, off = q10, ow0 + ow
                        if q11 > best or q11 != q11:
                            best, off = q11, ow0 + ow + 1
                        yt[_u(dst + e)] = best
                        it[_u(dst + e)] = off
                if pooled:
                    continue
                for r in range(TILE):
                    for q in range(TILE):
                        if TILE * i + r < oh and TILE * j + q < ow:
                            dst = (o + r * ow + q) * cp + c0
                            for e in range(vl):
                                yt[_u(dst + e)] = y[(TILE * r + q) * vl + e]


@njit(cache=True, _nrt=False)
def _grad_tiles(gt, yrt, relu, pooled, pit, dm, mbase, plane, cp, cout, i0, i1, tw, oh, ow, db):
    """dM[xi, t, :] = (A dY A^T)[xi] (at ``mbase + xi*plane + t*cp``, t = (i - i0)*tw + j) for each
    output tile's grad dY in tile rows [i0, i1) of one sample, channels last: from grad_y gt
    (oh*ow, cp), masked where the forward's output ``yrt`` is not positive with ``relu``; with
    ``pooled``, gt and yrt are the pool's ((oh//2)*(ow//2), cp) and each window's gradient goes to
    its maximum, ``pit``. Adds each channel's sum to ``db``; returns how many pool indices were
    outside their window."""
    vl = _lanes(dm)
    k = _consts(dm)
    a = _VECTORS16(dm)  # the tile's dY (16 vectors of channels)
    out = _VECTORS36(dm)
    zero = dm.dtype.type(0)
    ph_, pw_ = oh // 2, ow // 2
    bad = 0
    for i in range(i0, i1):
        for j in range(tw):
            t = mbase + ((i - i0) * tw + j) * cp
            o = TILE * (i * ow + j)
            for c0 in range(0, cp, vl):
                # branch-free lane loops (the branches are loop-invariant): each vectorizes
                for x in range(TILE * TILE):
                    r, q = x // TILE, x % TILE
                    if pooled or not (TILE * i + r < oh and TILE * j + q < ow):
                        for e in range(vl):
                            a[x * vl + e] = zero
                        continue
                    src = (o + r * ow + q) * cp + c0
                    if relu:
                        for e in range(vl):
                            g = gt[_u(src + e)]
                            a[x * vl + e] = g if yrt[_u(src + e)] > zero else zero
                    else:
                        for e in range(vl):
                            a[x * vl + e] = gt[_u(src + e)]
                for wnd in range(4 if pooled else 0):
                    whole, pooled_at, x0, ow0 = _pool_window(i, j, wnd, ph_, pw_, ow)
                    if not whole:
                        continue
                    src = pooled_at * cp + c0
                    for e in range(vl):
                        g = gt[_u(src + e)]
                        if relu:
                            g = g if yrt[_u(src + e)] > zero else zero
                        off = pit[_u(src + e)] - ow0
                        a[x0 * vl + e] = g if off == 0 else zero
                        a[(x0 + 1) * vl + e] = g if off == 1 else zero
                        a[(x0 + TILE) * vl + e] = g if off == ow else zero
                        a[(x0 + TILE + 1) * vl + e] = g if off == ow + 1 else zero
                        inside = (off == 0) | (off == 1) | (off == ow) | (off == ow + 1)
                        bad += 0 if inside | (c0 + e >= cout) else 1  # lanes past C_out hold no index
                for x in range(TILE * TILE):  # on its own: inside the loop below, db's updates stayed scalar
                    for e in range(vl):
                        db[c0 + e] += a[x * vl + e]
                for e in range(vl):
                    for q in range(TILE):  # A dY, down column q
                        c6 = _a_of(a[q * vl + e], a[(TILE + q) * vl + e], a[(2 * TILE + q) * vl + e],
                                   a[(3 * TILE + q) * vl + e], k)
                        for r in range(WINDOW):
                            out[(WINDOW * r + q) * vl + e] = c6[r]
                    for r in range(WINDOW):  # (A dY) A^T, along row r
                        c6 = _a_of(out[WINDOW * r * vl + e], out[(WINDOW * r + 1) * vl + e],
                                   out[(WINDOW * r + 2) * vl + e], out[(WINDOW * r + 3) * vl + e], k)
                        for q in range(WINDOW):
                            out[(WINDOW * r + q) * vl + e] = c6[q]
                for x in range(POSITIONS):
                    dst = t + x * plane + c0
                    for e in range(vl):
                        dm[_u(dst + e)] = out[x * vl + e]
    return bad


@njit(cache=True, _nrt=False)
def _input_grad_tiles(dv, vbase, plane, cp, i0, i1, tw, dxg, wg):
    """Adds ``B dV B^T`` of each tile of rows [i0, i1) (dV[xi, t, :] at ``vbase + xi*plane + t*cp``,
    t = (i - i0)*tw + j) onto its 6x6 window of the grad-input grid ``dxg`` (Hg, wg, cp); windows
    overlap, so tiles go in turn."""
    vl = _lanes(dv)
    k = _consts(dv)
    a = _VECTORS36(dv)
    for i in range(i0, i1):
        for j in range(tw):
            t = vbase + ((i - i0) * tw + j) * cp
            s = (TILE * i * wg + TILE * j) * cp
            for c0 in range(0, cp, vl):
                for x in range(POSITIONS):
                    src = t + x * plane + c0
                    for e in range(vl):
                        a[x * vl + e] = dv[_u(src + e)]
                for e in range(vl):
                    for q in range(WINDOW):  # B dV, down column q
                        y = _b_of(_six(a, q, WINDOW, vl, e), k)
                        for r in range(WINDOW):
                            a[(WINDOW * r + q) * vl + e] = y[r]
                    for r in range(WINDOW):  # (B dV) B^T, along row r
                        y = _b_of(_six(a, WINDOW * r, 1, vl, e), k)
                        for q in range(WINDOW):
                            a[(WINDOW * r + q) * vl + e] = y[q]
                for r in range(WINDOW):
                    for q in range(WINDOW):
                        dst = s + (r * wg + q) * cp + c0
                        for e in range(vl):
                            dxg[_u(dst + e)] += a[(WINDOW * r + q) * vl + e]


@njit(cache=True, _nrt=False)
def _to_grid(x, xg, wg, cp, ph, pw, stage):
    """Interior of the zero-bordered, channels-last grid: x (C, H, W) at (ph, pw) of xg (Hg, wg, cp).
    The whole sample is transposed at once into ``stage`` (H*W, cp), whose rows are long enough for
    whole register blocks (an 8-wide map row is not), then copied in by rows of the map."""
    c, h, w = x.shape
    _transpose(x.reshape(-1), 0, h * w, c, h * w, stage, 0, cp)
    for r in range(h):
        dst, src = ((r + ph) * wg + pw) * cp, r * w * cp
        for e in range(w * cp):
            xg[_u(dst + e)] = stage[_u(src + e)]


@njit(cache=True, _nrt=False)
def _from_grid(dxg, dx, wg, cp, ph, pw, stage):
    """dx (C, H, W) = the grid's interior at (ph, pw), through ``stage`` as in _to_grid; the grid
    is zeroed for the next sample."""
    c, h, w = dx.shape
    for r in range(h):
        src, dst = ((r + ph) * wg + pw) * cp, r * w * cp
        for e in range(w * cp):
            stage[_u(dst + e)] = dxg[_u(src + e)]
    _transpose(stage, 0, cp, h * w, c, dx.reshape(-1), 0, h * w)
    dxg[:] = dxg.dtype.type(0)


@njit(fastmath=FMA, cache=True, _nrt=False)
def _tiles(m, n, k, a, aoff, ars, acs, b, boff, bstride, boffs, c, coff, crs, beta, tile):
    """C (m~ x n~, rows crs apart) = A @ B + beta*C by whole MR x NR tiles: A strided; B as NR-column
    panels (``bstride`` apart, k-major) when ``boffs`` is None, else rows at ``b[boff + boffs[p]]``."""
    mr = _tile_rows(a)
    one = c.dtype.type(1)
    n_tiles = _cdiv(m, mr)
    for jr in range(0, n, NR):
        if boffs is None:
            _micro_kernel(k, a, aoff, ars, acs, None, b, boff + (jr // NR) * bstride, None, tile,
                          c, coff + jr, crs, one, beta, True, n_tiles, mr * ars)
        else:
            _micro_kernel(k, a, aoff, ars, acs, None, b, boff + jr, boffs, tile,
                          c, coff + jr, crs, one, beta, True, n_tiles, mr * ars)


# ---------------------------------------------------------------------------
# Drivers: per-thread scratch is grid | V | M | output | staging (forward), or grid | V | dM |
# dV | grad-input grid | grad_y | output | staging (backward), then the micro-kernel's tile.


@njit(inline="always")
def _geometry(geo):
    """(pad h, pad w, OH, OW, tile rows, tile columns, grid Hg, Wg, samples per chunk,
    tiles~ per chunk, C_in~, C_out~, tile rows per band, V's and M's plane strides): Plan.geo."""
    return (geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8], geo[9], geo[10], geo[11],
            geo[12], geo[13], geo[14])


@njit(inline="always")
def _cut(buf, o, n):
    """The slice of ``buf`` at o of length n, and the offset after it."""
    return buf[o:o + n], o + n


@njit(cache=True, _nrt=False)
def _transform_inputs(x, n0, n1, i0, i1, xg, v, geo, stage):
    """V of tile rows [i0, i1) of samples [n0, n1) side by side: each sample copied into the grid
    (at its first band), then transformed."""
    ph, pw, _, _, _, tw, _, wg, _, _, cip, _, _, vpl, _ = _geometry(geo)
    for n in range(n0, n1):
        if i0 == 0:
            _to_grid(x[n], xg, wg, cip, ph, pw, stage)
        _input_transform(xg, wg, cip, i0, i1, tw, v, (n - n0) * (i1 - i0) * tw * cip, vpl)


@njit(parallel=True, cache=True)
def _forward_kernel(x, ut, bias, relu, pooled, y, pidx, ws, iws, geo, n_threads):
    # x (N, C_in, H, W); ut (36, C_out~/NR, C_in, NR): U[xi].T in NR-column panels; bias (C_out~);
    # y (N, C_out, OH*OW), or with pooled (N, C_out, PH*PW) and pidx too; iws (T, >= PH*PW*C_out~)
    # int64 scratch; geo: see Plan
    n_samples, cin = x.shape[0], x.shape[1]
    cout, npos = y.shape[1], y.shape[2]
    ph, pw, oh, ow, th, tw, hg, wg, per, tp, cip, cop, bt, vpl, mpl = _geometry(geo)
    glen, vlen, mlen = hg * wg * cip, POSITIONS * vpl, POSITIONS * mpl
    n_units = -(-n_samples // per)
    claims = zeros(1, np.int64)
    zero = x.dtype.type(0)
    for t in prange(n_threads):
        xg, o = _cut(ws[t], 0, glen)
        v, o = _cut(ws[t], o, vlen)
        m, o = _cut(ws[t], o, mlen)
        yt, o = _cut(ws[t], o, npos * cop)  # one sample's output, channels last
        stage, o = _cut(ws[t], o, glen)  # one sample's input, channels last
        tile = ws[t, o:]
        it = iws[t]
        xg[:] = zero
        stage[:] = zero  # channels past C_in stay zero
        while True:
            u = _claim(claims, 0)
            if u >= n_units:
                break
            n0, n1 = u * per, min(n_samples, (u + 1) * per)
            for i0 in range(0, th, bt):  # bands of tile rows (one band unless a sample is large)
                i1 = min(th, i0 + bt)
                band = (i1 - i0) * tw
                _transform_inputs(x, n0, n1, i0, i1, xg, v, geo, stage)
                for xi in range(POSITIONS):  # M[xi] (tiles x C_out) = V[xi] (tiles x C_in) @ U[xi].T
                    _tiles((n1 - n0) * band, cout, cin, v, xi * vpl, cip, 1, ut[xi].reshape(-1), 0, cin * NR,
                           None, m, xi * mpl, cop, zero, tile)
                for n in range(n0, n1):
                    _output_transform(m, (n - n0) * band * cop, mpl, cop, i0, i1, tw, oh, ow, bias, relu, pooled,
                                      yt, it)
                    if i1 == th:
                        _transpose(yt, 0, cop, npos, cout, y[n].reshape(-1), 0, npos)
                        if pooled:
                            _transpose(it, 0, cop, npos, cout, pidx[n].reshape(-1), 0, npos)


@njit(parallel=True, cache=True)
def _backward_kernel(gy, yr, relu, pooled, pidx, x, u, dx, do_dx, du, db, nbad, ws, iws, voffs, geo, n_threads):
    # gy, yr (N, C_out, OH*OW or PH*PW); x, dx (N, C_in, H, W); u (36, C_in~/NR, C_out, NR): U[xi]
    # in NR-column panels; per-thread partials du (T, 36, C_out~, C_in~) and db (T, C_out~);
    # voffs: the rows of V (tile p at p*C_in~); geo as forward's
    n_samples, cin = x.shape[0], x.shape[1]
    cout, npos = gy.shape[1], gy.shape[2]
    ph, pw, oh, ow, th, tw, hg, wg, per, tp, cip, cop, bt, vpl, mpl = _geometry(geo)
    glen, vlen, mlen = hg * wg * cip, POSITIONS * vpl, POSITIONS * mpl
    coutr = du.shape[2]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    for t in prange(n_threads):
        xg, o = _cut(ws[t], 0, glen)
        v, o = _cut(ws[t], o, vlen)
        dm, o = _cut(ws[t], o, mlen)
        dv, o = _cut(ws[t], o, vlen)
        dxg, o = _cut(ws[t], o, glen)
        gt, o = _cut(ws[t], o, npos * cop)  # one sample's grad_y and the forward's output, channels last
        yrt, o = _cut(ws[t], o, npos * cop)
        stage, o = _cut(ws[t], o, glen)  # one sample's input or grad input, channels last
        tile = ws[t, o:]
        it = iws[t]
        xg[:] = zero
        stage[:] = zero  # channels past C_in stay zero
        dxg[:] = zero
        gt[:] = zero  # channels past C_out stay zero
        lo, hi = t * n_samples // n_threads, (t + 1) * n_samples // n_threads
        for n0 in range(lo, hi, per):
            n1 = min(hi, n0 + per)
            for i0 in range(0, th, bt):
                i1 = min(th, i0 + bt)
                band = (i1 - i0) * tw
                _transform_inputs(x, n0, n1, i0, i1, xg, v, geo, stage)
                for n in range(n0, n1):
                    if i0 == 0:
                        _transpose(gy[n].reshape(-1), 0, npos, cout, npos, gt, 0, cop)
                        if relu:
                            _transpose(yr[n].reshape(-1), 0, npos, cout, npos, yrt, 0, cop)
                        if pooled:
                            _transpose(pidx[n].reshape(-1), 0, npos, cout, npos, it, 0, cop)
                    nbad[t] += _grad_tiles(gt, yrt, relu, pooled, it, dm, (n - n0) * band * cop, mpl, cop, cout,
                                           i0, i1, tw, oh, ow, db[t])
                rows = (n1 - n0) * band
                for xi in range(POSITIONS):
                    # grad weight: dU[xi] (C_out x C_in) += dM[xi].T @ V[xi], reduced over the tiles
                    _tiles(coutr, cin, rows, dm, xi * mpl, 1, cop, v, xi * vpl, 0, voffs,
                           du[t, xi].reshape(-1), 0, cip, one, tile)
                    if do_dx:  # grad input: dV[xi] (tiles x C_in) = dM[xi] @ U[xi]
                        _tiles(rows, cin, cout, dm, xi * mpl, cop, 1, u[xi].reshape(-1), 0, cout * NR, None,
                               dv, xi * vpl, cip, zero, tile)
                if do_dx:
                    for n in range(n0, n1):
                        _input_grad_tiles(dv, (n - n0) * band * cip, vpl, cip, i0, i1, tw, dxg, wg)
                        if i1 == th:
                            _from_grid(dxg, dx[n], wg, cip, ph, pw, stage)


for _kernel in (_weight_panels, _weight_panel_rows, _weight_gradient, _weight_gradient_rows, _transpose,
                _input_transform, _output_transform, _grad_tiles, _input_grad_tiles, _to_grid, _from_grid, _tiles,
                _transform_inputs, _forward_kernel, _backward_kernel):
    vectorized(_kernel)


# ---------------------------------------------------------------------------
# Planning (Python side: shapes were validated before this)


def _round_up(a, b):
    return -(-a // b) * b


def _odd_lines(floats, dtype):
    """A plane stride of at least ``floats`` that is an odd number of 64-byte lines.

    The transforms touch one line in each of the 36 planes per vector of channels; planes a
    multiple of 4 KiB apart (128 tiles x 32 channels of float32) all fall in one 8-way L1 set
    and evict each other. An odd line count is invertible mod the 64 sets: 36 different sets.
    """
    per_line = 64 // dtype.itemsize
    lines = -(-floats // per_line)
    return (lines + 1 - lines % 2) * per_line


class Plan:
    """Tile grid, samples per chunk and scratch layout of one F(4x4, 3x3) conv call.

    Several small samples make one chunk; a large one is split into bands of tile rows
    whose V, M and dM fit the chunk budget (its grid and channels-last grad_y stay whole).
    ``fits`` is False only when even one tile row would not fit or the workspace would pass
    the conv workspace cap (``max_bytes`` for all threads): conv.py then keeps im2col.
    """

    def __init__(self, n, c_in, c_out, pad, out, dtype, n_threads, backward, max_bytes=64 << 20):
        oh, ow = out
        th, tw = -(-oh // TILE), -(-ow // TILE)
        hg, wg = TILE * th + 2, TILE * tw + 2  # every tile's 6x6 window, zeros past the input
        mr = 8 if dtype == np.float32 else 4
        self.cip, self.cop = cip, cop = _round_up(c_in, NR), _round_up(c_out, NR)
        self.coutr = _round_up(c_out, mr)
        tps = th * tw
        glen = hg * wg * cip

        npos = oh * ow  # the output (or with a pool, fewer) positions, channels last
        self.index_len = npos * cop

        def chunk(tiles):  # the chunk's V, M (V, dM, dV), and its tile count rounded to MR
            tp = _round_up(tiles, mr)
            vpl, mpl = _odd_lines(tp * cip, dtype), _odd_lines(tp * cop, dtype)
            return tp, POSITIONS * (2 * vpl + mpl if backward else vpl + mpl)

        budget = _CHUNK_BYTES // dtype.itemsize
        per = max(1, min(-(-_TARGET_TILES // tps), -(-n // n_threads)))
        while per > 1 and chunk(per * tps)[1] > budget:
            per -= 1
        bt = th  # tile rows per band: a whole sample, or fewer when one does not fit
        while bt > 1 and chunk(bt * tw)[1] > budget:
            bt -= 1
        tp, floats = chunk(per * bt * tw)
        vpl, mpl = _odd_lines(tp * cip, dtype), _odd_lines(tp * cop, dtype)
        whole = (3 * glen + 2 * npos * cop) if backward else (2 * glen + npos * cop)  # grids, staging, maps
        self.per_thread = floats + whole + mr * NR
        self.fits = floats <= budget and self.per_thread * dtype.itemsize * n_threads <= max_bytes
        self.geo = np.array([pad[0], pad[1], oh, ow, th, tw, hg, wg, per, tp, cip, cop, bt, vpl, mpl], np.int64)
        self.voffs = (np.arange(tp) * cip).astype(np.int64)

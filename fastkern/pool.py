"""Pooling: max, average and global average, 1-D and 2-D, each with its backward.

Semantics follow ``torch.nn.functional`` (floor-mode output size, i.e.
``ceil_mode=False``): ``out = (L + 2*padding - dilation*(kernel-1) - 1) // stride + 1``,
padding at most half the kernel, padded positions never win a max, ties go to
the first maximum in window order and a NaN wins. ``max_pool*`` indices are
flat positions in each input plane (``h * W + w``), int64, as torch returns them.

Inputs are (N, C, H, W) for 2-D (or unbatched (C, H, W)) and (N, C, L) for
1-D (or (C, L)). A 1-D pool is a 2-D pool over (1, L) planes. Every kernel
works on a stack of planes (N*C, H, W): ``prange`` hands each iteration whole
planes, so the backward scatters (which overlap when stride < kernel) never
write one element from two threads, and results are deterministic. The
parallel drivers hand planes out as ``borrowed`` views and the per-plane
kernels run without reference counting (gemm.py's ``_nrt`` note): a plane of
LeNet's second pool is 100 elements, less work than refcount atomics on
arrays both threads share.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from ._checks import as_tuple, check_array, check_non_negative, check_positive, memoize_plain
from ._codegen import vectorized
from .gemm import _lanes, _MaskedRow, borrowed

# Below this many input elements the whole op is a few microseconds on one
# core, less than waking the thread pool.
PARALLEL_MIN = 1 << 15


# ---------------------------------------------------------------- argument handling


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_geometry(spatial, nd, kernel_size, stride, padding, dilation, what):
    """Validated (k, s, p, d, out) per spatial dim, each a tuple of length ``nd``."""
    k = check_positive(as_tuple(kernel_size, nd, "kernel_size"), "kernel_size")
    s = k if stride is None else check_positive(as_tuple(stride, nd, "stride"), "stride")
    p = check_non_negative(as_tuple(padding, nd, "padding"), "padding")
    d = check_positive(as_tuple(dilation, nd, "dilation"), "dilation")
    if any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise ValueError(f"padding must be at most half of kernel_size, got padding={p}, kernel_size={k}")
    out = []
    for size, ki, si, pi, di in zip(spatial, k, s, p, d):
        span = di * (ki - 1) + 1
        if size + 2 * pi < span:
            raise ValueError(
                f"{what} window (kernel_size={k}, dilation={d}) is larger than the padded input: "
                f"input size {tuple(spatial)} with padding={p}"
            )
        o = _conv_out(size, ki, si, pi, di)
        if di > 1 and pi > 0:
            # Dilated windows at the border can straddle the input entirely.
            for j in range(o):
                if not any(0 <= j * si - pi + t * di < size for t in range(ki)):
                    raise ValueError(
                        f"{what} window {j} (kernel_size={k}, stride={s}, padding={p}, dilation={d}) "
                        f"covers only padding for input size {tuple(spatial)}"
                    )
        out.append(o)
    return k, s, p, d, tuple(out)


@memoize_plain
def _geometry(spatial, nd, kernel_size, stride, padding, dilation, what):
    """Validated geometry in the caller's ``nd`` dims, lifted to the (H, W) of a plane."""
    k, s, p, d, out = _pool_geometry(spatial, nd, kernel_size, stride, padding, dilation, what)
    return _lift(k, nd, 1), _lift(s, nd, 1), _lift(p, nd, 0), _lift(d, nd, 1), _lift(out, nd, 1)


def _check_input(x, nd):
    check_array(x, "x", (nd + 1, nd + 2))
    if x.ndim == nd + 1:
        x = x[None]
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    if nd == 1:
        spatial = (1,) + spatial
    # Numba kernels index a C-contiguous (planes, H, W) stack.
    return np.ascontiguousarray(x).reshape(n * c, *spatial)


def _check_input_shape(input_shape, nd):
    if not isinstance(input_shape, (tuple, list)) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in input_shape
    ):
        raise TypeError(f"input_shape must be a tuple of non-negative ints, got {input_shape!r}")
    if len(input_shape) not in (nd + 1, nd + 2):
        raise ValueError(f"input_shape must have {nd + 1} or {nd + 2} dims, got {tuple(input_shape)}")
    return tuple(int(v) for v in input_shape)


def _out_shape(input_shape, out_spatial, nd):
    return tuple(input_shape[: len(input_shape) - nd]) + tuple(out_spatial[-nd:])


def _lift(t, nd, one):
    """A 1-D parameter tuple as the (H, W) pair of a (1, L) plane."""
    return (one,) + t if nd == 1 else t


def _check_grad(grad_y, out_shape, what):
    check_array(grad_y, "grad_y")
    if grad_y.shape != tuple(out_shape):
        raise ValueError(f"grad_y has shape {grad_y.shape}, expected {tuple(out_shape)} ({what} output)")


def _run(serial, par, size, *args):
    """Serial kernel below PARALLEL_MIN elements, the prange one above."""
    if size < PARALLEL_MIN:
        serial(*args)
    else:
        par(*args)


# ---------------------------------------------------------------- max pool: forward


@njit(cache=True, nogil=True, _nrt=False)
def _max_plane(x, y, idx, with_idx, kh, kw, sh, sw, ph, pw, dh, dw):
    h, w = x.shape
    oh_, ow_ = y.shape
    for oh in range(oh_):
        h0 = oh * sh - ph
        h1 = min(h0 + (kh - 1) * dh + 1, h)
        while h0 < 0:
            h0 += dh
        for ow in range(ow_):
            w0 = ow * sw - pw
            w1 = min(w0 + (kw - 1) * dw + 1, w)
            while w0 < 0:
                w0 += dw
            best = -np.inf
            bi = h0 * w + w0
            for ih in range(h0, h1, dh):
                for iw in range(w0, w1, dw):
                    v = x[ih, iw]
                    if v > best or np.isnan(v):
                        best = v
                        bi = ih * w + iw
            y[oh, ow] = best
            if with_idx:
                idx[oh, ow] = bi


def _window_pair_lanes(r, ary, off, w, n):
    """The four taps a, b, c, d of windows [0, n) of a 2x2 stride-2 pool as vectors: window e
    reads ``ary[off + 2e]``, ``[off + 2e + 1]`` and the same at ``off + w``. Masked loads: only
    the 2n values of each row are touched."""
    b, vl = r.b, r.vl
    two_n = b.mul(n, n.type(2))
    masks = r.mask(two_n), r.mask(b.sub(two_n, n.type(vl)))
    evens = llvm_ir.Constant(llvm_ir.VectorType(r.i32, vl), [2 * e for e in range(vl)])
    odds = llvm_ir.Constant(llvm_ir.VectorType(r.i32, vl), [2 * e + 1 for e in range(vl)])
    taps = []
    for row in (off, b.add(off, w)):
        lo = r.load(r.pointer(ary, row), masks[0])
        hi = r.load(r.pointer(ary, b.add(row, row.type(vl))), masks[1])
        taps += [b.shuffle_vector(lo, hi, evens), b.shuffle_vector(lo, hi, odds)]
    return taps


def _i64_masked(builder, op, vl):
    """LLVM's masked ``op`` ("load" or "store") of VL int64 lanes, and that vector type."""
    i64v = llvm_ir.VectorType(llvm_ir.IntType(64), vl)
    i1v = llvm_ir.VectorType(llvm_ir.IntType(1), vl)
    ptr = i64v.as_pointer()
    i32 = llvm_ir.IntType(32)
    if op == "store":
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i64v, ptr, i32, i1v])
    else:
        fnty = llvm_ir.FunctionType(i64v, [ptr, i32, i1v, i64v])
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.{op}.v{vl}i64.p0"), i64v


def _pool_operands(values, indices, other):
    """Whether the intrinsics below accept these Numba types: 1-D C arrays, one float dtype
    for ``values`` and ``other``, int64 ``indices``."""
    return (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (values, indices, other))
            and values.dtype == other.dtype and isinstance(values.dtype, types.Float)
            and indices.dtype == types.int64)


@intrinsic
def _max_2x2_vector(typingctx, x, i0, w, wd, y, j0, n, idx, base, with_idx, bias, relu):
    """Windows [0, n) (n <= VL) of one output row of a 2x2 stride-2 max pool, as masked vectors.

    Window e reads x[i0 + 2e], x[i0 + 2e + 1], x[i0 + wd + 2e], x[i0 + wd + 2e + 1], each plus
    ``bias`` and through a ReLU with ``relu`` (a conv's epilogue; a pool alone passes -0.0,
    which leaves every value as it is), and writes ``y[j0 + e]``, and with ``with_idx``
    ``idx[j0 + e] = base + 2e + the winner's offset`` (0, 1, w, w + 1: positions in rows
    ``w`` wide). The winner is torch's sequential scan's (strict >, a NaN wins, the first of
    ties): three compare-and-selects over whole vectors, where a scalar scan cost about 20
    instructions per window and rows of 5 or 14 windows never filled a vector loop. No bounds
    checks: the caller keeps every window inside ``x``.
    """
    if not (_pool_operands(x, idx, y) and bias == x.dtype):
        return None

    def codegen(context, builder, sig, args):
        xa, ya, ia = (make_array(sig.args[k])(context, builder, value=args[k]) for k in (0, 4, 7))
        r = _MaskedRow(context, builder, x.dtype)
        vl, b = r.vl, builder
        i64 = llvm_ir.IntType(64)
        w, n = args[2], args[6]
        zero = llvm_ir.Constant(r.vty, None)
        relu = b.icmp_unsigned("!=", args[11], llvm_ir.Constant(args[11].type, 0))
        taps = []
        for v in _window_pair_lanes(r, xa, args[1], args[3], n):
            v = b.fadd(v, r.splat(args[10], r.vty))
            taps.append(b.select(b.and_(r.splat(relu, r.mask(n).type), b.fcmp_ordered("<", v, zero)), zero, v))
        store, i64v = _i64_masked(b, "store", vl)
        best, off = taps[0], llvm_ir.Constant(i64v, None)
        for v, o in zip(taps[1:], (i64(1), w, b.add(w, i64(1)))):
            t = b.or_(b.fcmp_ordered(">", v, best), b.fcmp_unordered("uno", v, v))
            best = b.select(t, v, best)
            off = b.select(t, r.splat(o, i64v), off)
        mask = r.mask(n)
        r.store(best, r.pointer(ya, args[5]), mask)
        with b.if_then(b.icmp_unsigned("!=", args[9], llvm_ir.Constant(args[9].type, 0))):
            lane2 = llvm_ir.Constant(i64v, [2 * e for e in range(vl)])
            val = b.add(b.add(r.splat(args[8], i64v), lane2), off)
            ptr = b.bitcast(b.gep(ia.data, [args[5]]), i64v.as_pointer())
            b.call(store, [val, ptr, r.i32(1), mask])
        return context.get_dummy_value()

    idx_t = types.intp
    return (types.none(x, idx_t, idx_t, idx_t, y, idx_t, idx_t, idx, idx_t, types.boolean, bias, types.boolean),
            codegen)


@intrinsic
def _max_2x2_back_vector(typingctx, g, j0, idx, base, n, gx, i0, w, wd, y, relu):
    """Gradient of :func:`_max_2x2_vector`'s windows [0, n): every tap of window e is written
    once, ``g[j0 + e]`` where ``idx[j0 + e] - base - 2e`` names it (offsets 0, 1, w, w + 1) and
    zero elsewhere, as two interleaved masked row stores at ``gx[i0:]`` and ``gx[i0 + wd:]``.
    With ``relu``, ``g[j0 + e]`` counts only where ``y[j0 + e] > 0`` (the pool's output, when
    a ReLU fed it). Returns how many of the n indices name no tap of their window (their
    gradient is dropped). No bounds checks."""
    if not (_pool_operands(g, idx, gx) and _pool_operands(y, idx, gx)):
        return None

    def codegen(context, builder, sig, args):
        ga, ia, xa, ya = (make_array(sig.args[k])(context, builder, value=args[k]) for k in (0, 2, 5, 9))
        r = _MaskedRow(context, builder, g.dtype)
        vl, b = r.vl, builder
        i64 = llvm_ir.IntType(64)
        n, w, wd = args[4], args[7], args[8]
        mask = r.mask(n)
        zero = llvm_ir.Constant(r.vty, None)
        gv = r.load(r.pointer(ga, args[1]), mask)
        relu = b.icmp_unsigned("!=", args[10], llvm_ir.Constant(args[10].type, 0))
        relu_lanes = b.and_(mask, r.splat(relu, mask.type))  # no lane of y is read without relu
        yv = r.load(r.pointer(ya, args[1]), relu_lanes)
        gv = b.select(b.and_(relu_lanes, b.not_(b.fcmp_ordered(">", yv, zero))), zero, gv)
        load, i64v = _i64_masked(b, "load", vl)
        start = b.add(r.splat(args[3], i64v), llvm_ir.Constant(i64v, [2 * e for e in range(vl)]))
        iv = b.call(load, [b.bitcast(b.gep(ia.data, [args[1]]), i64v.as_pointer()), r.i32(1), mask, start])
        off = b.sub(iv, start)  # masked-off lanes read as offset 0: never counted as bad
        hits = [b.icmp_signed("==", off, r.splat(o, i64v)) for o in (i64(0), i64(1), w, b.add(w, i64(1)))]
        taps = [b.select(h, gv, zero) for h in hits]
        ok = b.or_(b.or_(hits[0], hits[1]), b.or_(hits[2], hits[3]))
        bits = b.bitcast(b.xor(ok, llvm_ir.Constant(ok.type, [1] * vl)), llvm_ir.IntType(vl))
        ctpop = cgutils.get_or_insert_function(
            b.module, llvm_ir.FunctionType(llvm_ir.IntType(vl), [llvm_ir.IntType(vl)]), f"llvm.ctpop.i{vl}")
        bad = b.zext(b.call(ctpop, [bits]), i64)
        two_n = b.mul(n, i64(2))
        masks = r.mask(two_n), r.mask(b.sub(two_n, i64(vl)))
        half = vl // 2
        lo = llvm_ir.Constant(llvm_ir.VectorType(r.i32, vl), [e // 2 + (e % 2) * vl for e in range(vl)])
        hi = llvm_ir.Constant(llvm_ir.VectorType(r.i32, vl), [half + e // 2 + (e % 2) * vl for e in range(vl)])
        for row, (left, right) in ((args[6], taps[:2]), (b.add(args[6], wd), taps[2:])):
            r.store(b.shuffle_vector(left, right, lo), r.pointer(xa, row), masks[0])
            r.store(b.shuffle_vector(left, right, hi), r.pointer(xa, b.add(row, i64(vl))), masks[1])
        return bad

    idx_t = types.intp
    return types.int64(g, idx_t, idx, idx_t, idx_t, gx, idx_t, idx_t, idx_t, y, types.boolean), codegen


@njit(inline="always")
def _max_2x2_row(x, i0, w, wd, y, j0, n, idx, base, with_idx, bias, relu):
    """All n windows of one output row through :func:`_max_2x2_vector`, a vector of them at a time."""
    vl = _lanes(x)
    for e in range(0, n, vl):
        _max_2x2_vector(x, i0 + 2 * e, w, wd, y, j0 + e, min(vl, n - e), idx, base + 2 * e, with_idx, bias, relu)


@njit(inline="always")
def _max_2x2_back_row(g, j0, idx, base, n, gx, i0, w, wd, y, relu):
    """All n windows of one output row through :func:`_max_2x2_back_vector`; returns the bad count."""
    vl = _lanes(g)
    bad = 0
    for e in range(0, n, vl):
        bad += _max_2x2_back_vector(g, j0 + e, idx, base + 2 * e, min(vl, n - e), gx, i0 + 2 * e, w, wd, y, relu)
    return bad


@njit(cache=True, nogil=True, _nrt=False)
def _max_2x2_planes(x, y, idx, with_idx, h, w, lo, hi):
    """Planes [lo, hi) of a kernel 2, stride 2, unpadded max pool; x, y, idx flat (planes, H, W)
    and (planes, H//2, W//2) stacks."""
    oh_, ow_ = h // 2, w // 2
    keep = x.dtype.type(-0.0)  # x + -0.0 is x for every x, -0.0 included
    for p in range(lo, hi):
        for oh in range(oh_):
            _max_2x2_row(x, (p * h + 2 * oh) * w, w, w, y, (p * oh_ + oh) * ow_, ow_, idx, 2 * oh * w, with_idx,
                         keep, False)


# Planes per prange iteration: at 8 planes of a 32x32 float32 map (32 KiB) a
# block is still far below L2, and LeNet's second pool (1024 planes of 100
# values) makes 128 iterations, not 1024 dispatches of one plane each.
PLANE_BLOCK = 8


@njit(cache=True, nogil=True)
def _max_plane_range(x, y, idx, with_idx, kh, kw, sh, sw, ph, pw, dh, dw, lo, hi):
    if kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0 and dh == 1 and dw == 1:
        _max_2x2_planes(x.reshape(x.size), y.reshape(y.size), idx.reshape(idx.size), with_idx,
                        x.shape[1], x.shape[2], lo, hi)
    else:
        for p in range(lo, hi):
            _max_plane(x[p], y[p], idx[p] if with_idx else idx[0], with_idx, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=True, nogil=True)
def _max_planes(x, y, idx, with_idx, kh, kw, sh, sw, ph, pw, dh, dw):
    _max_plane_range(x, y, idx, with_idx, kh, kw, sh, sw, ph, pw, dh, dw, 0, x.shape[0])


@njit(cache=True, parallel=True)
def _max_planes_par(x, y, idx, with_idx, kh, kw, sh, sw, ph, pw, dh, dw):
    x, y, idx = borrowed(x), borrowed(y), borrowed(idx)
    n = x.shape[0]
    for b in prange((n + PLANE_BLOCK - 1) // PLANE_BLOCK):
        _max_plane_range(x, y, idx, with_idx, kh, kw, sh, sw, ph, pw, dh, dw,
                         b * PLANE_BLOCK, min(n, (b + 1) * PLANE_BLOCK))


for _kernel in (_max_2x2_planes, _max_plane_range, _max_planes, _max_planes_par):
    vectorized(_kernel)  # 512-bit vectors: the intrinsics' zmm lanes are not split in two


def _max_pool(x, nd, kernel_size, stride, padding, dilation, return_indices):
    planes = _check_input(x, nd)
    k, s, p, d, out = _geometry(x.shape[-nd:], nd, kernel_size, stride, padding, dilation, "max_pool")
    y = np.empty((planes.shape[0],) + out, planes.dtype)
    idx = np.empty(y.shape if return_indices else (1, 1, 1), np.int64)
    _run(_max_planes, _max_planes_par, planes.size, planes, y, idx, bool(return_indices), *k, *s, *p, *d)
    out_shape = _out_shape(x.shape, out, nd)
    y = y.reshape(out_shape)
    return (y, idx.reshape(out_shape)) if return_indices else y


def max_pool1d(x, kernel_size, stride=None, padding=0, dilation=1, return_indices=False):
    """Max over sliding windows of (N, C, L) ``x``; ``(y, indices)`` with ``return_indices``.

    ``stride`` defaults to ``kernel_size``. Indices are positions in L (int64).
    """
    return _max_pool(x, 1, kernel_size, stride, padding, dilation, return_indices)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, return_indices=False):
    """Max over sliding windows of (N, C, H, W) ``x``; ``(y, indices)`` with ``return_indices``.

    ``stride`` defaults to ``kernel_size``. Indices are flat positions ``h * W + w``
    in each input plane (int64), as ``torch.nn.functional.max_pool2d`` returns them.
    The common 2x2 stride-2 unpadded pool takes a dedicated fast path.
    """
    return _max_pool(x, 2, kernel_size, stride, padding, dilation, return_indices)


# ---------------------------------------------------------------- max pool: backward


@njit(cache=True, nogil=True, _nrt=False)
def _max_back_plane(g, idx, gx):
    """Scatter one plane; returns how many indices fell outside the plane (then skipped)."""
    hw = gx.size
    flat = gx.reshape(hw)
    flat[:] = 0
    gf = g.reshape(g.size)
    jf = idx.reshape(idx.size)
    bad = 0
    for i in range(gf.size):
        j = jf[i]
        if j < 0 or j >= hw:
            bad += 1
        else:
            flat[j] += gf[i]
    return bad


@njit(cache=True, nogil=True, _nrt=False)
def _max_back_2x2_planes(g, idx, gx, bad, h, w, lo, hi):
    """Planes [lo, hi) of the gradient of the 2x2 stride-2 pool, flat stacks as in
    :func:`_max_2x2_planes`. The windows do not overlap, so every grad_x element is written
    once and there is no zero-fill pass; ``bad[p]`` counts plane p's indices that lie outside
    their own window (their gradient is dropped)."""
    oh_, ow_ = h // 2, w // 2
    zero = gx.dtype.type(0)
    for p in range(lo, hi):
        nbad = 0
        for oh in range(oh_):
            i0 = (p * h + 2 * oh) * w
            j0 = (p * oh_ + oh) * ow_
            nbad += _max_2x2_back_row(g, j0, idx, 2 * oh * w, ow_, gx, i0, w, w, g, False)
            for iw in range(2 * ow_, w):  # an odd last column is in no window
                gx[i0 + iw] = zero
                gx[i0 + w + iw] = zero
        for i in range((p * h + 2 * oh_) * w, (p + 1) * h * w):  # nor is an odd last row
            gx[i] = zero
        bad[p] = nbad


@njit(cache=True, nogil=True)
def _max_back_range(g, idx, gx, bad, fast, lo, hi):
    if fast:
        _max_back_2x2_planes(g.reshape(g.size), idx.reshape(idx.size), gx.reshape(gx.size), bad,
                             gx.shape[1], gx.shape[2], lo, hi)
    else:
        for p in range(lo, hi):
            bad[p] = _max_back_plane(g[p], idx[p], gx[p])


@njit(cache=True, nogil=True)
def _max_back_planes(g, idx, gx, bad, fast):
    _max_back_range(g, idx, gx, bad, fast, 0, gx.shape[0])


@njit(cache=True, parallel=True)
def _max_back_planes_par(g, idx, gx, bad, fast):
    g, idx, gx, bad = borrowed(g), borrowed(idx), borrowed(gx), borrowed(bad)
    n = gx.shape[0]
    for b in prange((n + PLANE_BLOCK - 1) // PLANE_BLOCK):
        _max_back_range(g, idx, gx, bad, fast, b * PLANE_BLOCK, min(n, (b + 1) * PLANE_BLOCK))


for _kernel in (_max_back_2x2_planes, _max_back_range, _max_back_planes, _max_back_planes_par):
    vectorized(_kernel)


def _max_pool_backward(grad_y, indices, input_shape, nd, kernel_size, stride, padding, dilation):
    input_shape = _check_input_shape(input_shape, nd)
    spatial = _lift(input_shape[-nd:], nd, 1)
    k, s, p, d, out = _geometry(input_shape[-nd:], nd, kernel_size, stride, padding, dilation, "max_pool")
    out_shape = _out_shape(input_shape, out, nd)
    _check_grad(grad_y, out_shape, "max_pool")
    if not isinstance(indices, np.ndarray) or indices.dtype != np.int64:
        raise TypeError(f"indices must be an int64 numpy.ndarray, got {getattr(indices, 'dtype', type(indices))}")
    if indices.shape != grad_y.shape:
        raise ValueError(f"indices has shape {indices.shape} but grad_y has shape {grad_y.shape}")
    planes = math.prod(input_shape[:-nd])
    gx = np.empty((planes,) + spatial, grad_y.dtype)
    g = np.ascontiguousarray(grad_y).reshape((planes,) + out)
    j = np.ascontiguousarray(indices).reshape((planes,) + out)
    bad = np.zeros(planes, np.int64)
    fast = k == (2, 2) and s == (2, 2) and p == (0, 0) and d == (1, 1)
    _run(_max_back_planes, _max_back_planes_par, gx.size, g, j, gx, bad, fast)
    nbad = int(bad.sum())
    if nbad:
        raise ValueError(
            f"{nbad} of indices' {indices.size} entries are outside their pooling window or the "
            f"input plane of shape {spatial[-nd:]}; pass the indices max_pool returned for this input"
        )
    return gx.reshape(input_shape)


def max_pool1d_backward(grad_y, indices, input_shape, kernel_size, stride=None, padding=0, dilation=1):
    """Gradient of :func:`max_pool1d`: ``grad_y`` routed to the ``indices`` positions (summed where windows overlap)."""
    return _max_pool_backward(grad_y, indices, input_shape, 1, kernel_size, stride, padding, dilation)


def max_pool2d_backward(grad_y, indices, input_shape, kernel_size, stride=None, padding=0, dilation=1):
    """Gradient of :func:`max_pool2d`: ``grad_y`` routed to the ``indices`` positions (summed where windows overlap).

    ``indices`` must come from ``max_pool2d(..., return_indices=True)`` with the
    same arguments; entries outside the input plane raise ValueError.
    """
    return _max_pool_backward(grad_y, indices, input_shape, 2, kernel_size, stride, padding, dilation)


# ---------------------------------------------------------------- average pool


@njit(cache=True, nogil=True, _nrt=False)
def _avg_window(oh, ow, h, w, kh, kw, sh, sw, ph, pw, include_pad):
    """Clipped window bounds and torch's divisor (padding counts, overhang past it does not)."""
    h0 = oh * sh - ph
    w0 = ow * sw - pw
    h1 = min(h0 + kh, h + ph)
    w1 = min(w0 + kw, w + pw)
    size = (h1 - h0) * (w1 - w0)
    h0, w0 = max(h0, 0), max(w0, 0)
    h1, w1 = min(h1, h), min(w1, w)
    if not include_pad:
        size = (h1 - h0) * (w1 - w0)
    return h0, h1, w0, w1, size


@njit(cache=True, nogil=True, _nrt=False)
def _avg_plane(x, y, kh, kw, sh, sw, ph, pw, include_pad):
    h, w = x.shape
    oh_, ow_ = y.shape
    for oh in range(oh_):
        for ow in range(ow_):
            h0, h1, w0, w1, size = _avg_window(oh, ow, h, w, kh, kw, sh, sw, ph, pw, include_pad)
            acc = 0.0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    acc += x[ih, iw]
            y[oh, ow] = acc / size


@njit(cache=True, nogil=True, _nrt=False)
def _avg_back_plane(g, gx, kh, kw, sh, sw, ph, pw, include_pad):
    h, w = gx.shape
    oh_, ow_ = g.shape
    gx[:, :] = 0
    for oh in range(oh_):
        for ow in range(ow_):
            h0, h1, w0, w1, size = _avg_window(oh, ow, h, w, kh, kw, sh, sw, ph, pw, include_pad)
            v = g[oh, ow] / size
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    gx[ih, iw] += v


@njit(cache=True, nogil=True)
def _avg_planes(x, y, kh, kw, sh, sw, ph, pw, include_pad):
    for p in range(x.shape[0]):
        _avg_plane(x[p], y[p], kh, kw, sh, sw, ph, pw, include_pad)


@njit(cache=True, parallel=True)
def _avg_planes_par(x, y, kh, kw, sh, sw, ph, pw, include_pad):
    x, y = borrowed(x), borrowed(y)
    for p in prange(x.shape[0]):
        _avg_plane(x[p], y[p], kh, kw, sh, sw, ph, pw, include_pad)


@njit(cache=True, nogil=True)
def _avg_back_planes(g, gx, kh, kw, sh, sw, ph, pw, include_pad):
    for p in range(gx.shape[0]):
        _avg_back_plane(g[p], gx[p], kh, kw, sh, sw, ph, pw, include_pad)


@njit(cache=True, parallel=True)
def _avg_back_planes_par(g, gx, kh, kw, sh, sw, ph, pw, include_pad):
    g, gx = borrowed(g), borrowed(gx)
    for p in prange(gx.shape[0]):
        _avg_back_plane(g[p], gx[p], kh, kw, sh, sw, ph, pw, include_pad)


def _avg_geometry(spatial, nd, kernel_size, stride, padding):
    k, s, p, _, out = _geometry(spatial, nd, kernel_size, stride, padding, 1, "avg_pool")
    return k, s, p, out


def _avg_pool(x, nd, kernel_size, stride, padding, count_include_pad):
    planes = _check_input(x, nd)
    k, s, p, out = _avg_geometry(x.shape[-nd:], nd, kernel_size, stride, padding)
    y = np.empty((planes.shape[0],) + out, planes.dtype)
    _run(_avg_planes, _avg_planes_par, planes.size, planes, y, *k, *s, *p, bool(count_include_pad))
    return y.reshape(_out_shape(x.shape, out, nd))


def _avg_pool_backward(grad_y, input_shape, nd, kernel_size, stride, padding, count_include_pad):
    input_shape = _check_input_shape(input_shape, nd)
    spatial = _lift(input_shape[-nd:], nd, 1)
    k, s, p, out = _avg_geometry(input_shape[-nd:], nd, kernel_size, stride, padding)
    _check_grad(grad_y, _out_shape(input_shape, out, nd), "avg_pool")
    planes = math.prod(input_shape[:-nd])
    gx = np.empty((planes,) + spatial, grad_y.dtype)
    g = np.ascontiguousarray(grad_y).reshape((planes,) + out)
    _run(_avg_back_planes, _avg_back_planes_par, gx.size, g, gx, *k, *s, *p, bool(count_include_pad))
    return gx.reshape(input_shape)


def avg_pool1d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Mean over sliding windows of (N, C, L) ``x``; ``count_include_pad`` as in torch."""
    return _avg_pool(x, 1, kernel_size, stride, padding, count_include_pad)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Mean over sliding windows of (N, C, H, W) ``x``.

    With ``count_include_pad`` (torch's default) zero padding counts in each
    window's divisor; without it only the input elements the window covers do.
    """
    return _avg_pool(x, 2, kernel_size, stride, padding, count_include_pad)


def avg_pool1d_backward(grad_y, input_shape, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Gradient of :func:`avg_pool1d`: each window's gradient spread evenly over it."""
    return _avg_pool_backward(grad_y, input_shape, 1, kernel_size, stride, padding, count_include_pad)


def avg_pool2d_backward(grad_y, input_shape, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Gradient of :func:`avg_pool2d`: each window's gradient spread evenly over it."""
    return _avg_pool_backward(grad_y, input_shape, 2, kernel_size, stride, padding, count_include_pad)


# ---------------------------------------------------------------- global average pool


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, _nrt=False)
def _gap_planes(x, y, lo, hi):
    for p in range(lo, hi):
        acc = 0.0
        for v in x[p]:
            acc += v
        y[p] = acc / x.shape[1]


@njit(cache=True, parallel=True)
def _gap_par(x, y):
    for p in prange(x.shape[0]):
        _gap_planes(x, y, p, p + 1)


@njit(cache=True, nogil=True, _nrt=False)
def _gap_back_planes(g, gx, lo, hi):
    for p in range(lo, hi):
        v = g[p] / gx.shape[1]
        gx[p, :] = v


@njit(cache=True, parallel=True)
def _gap_back_par(g, gx):
    for p in prange(gx.shape[0]):
        _gap_back_planes(g, gx, p, p + 1)


def global_avg_pool2d(x):
    """Mean over H and W of (N, C, H, W) ``x``, returned as (N, C)."""
    check_array(x, "x", 4)
    n, c, h, w = x.shape
    if h * w == 0:
        raise ValueError(f"global_avg_pool2d needs a non-empty plane, got x.shape={x.shape}")
    planes = np.ascontiguousarray(x).reshape(n * c, h * w)
    y = np.empty(n * c, x.dtype)
    if x.size < PARALLEL_MIN:
        _gap_planes(planes, y, 0, n * c)
    else:
        _gap_par(planes, y)
    return y.reshape(n, c)


def global_avg_pool2d_backward(grad_y, input_shape):
    """Gradient of :func:`global_avg_pool2d`: ``grad_y / (H*W)`` broadcast over each plane."""
    input_shape = _check_input_shape(input_shape, 2)
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {input_shape}")
    n, c, h, w = input_shape
    if h * w == 0:
        raise ValueError(f"global_avg_pool2d needs a non-empty plane, got input_shape={input_shape}")
    _check_grad(grad_y, (n, c), "global_avg_pool2d")
    g = np.ascontiguousarray(grad_y).reshape(n * c)
    gx = np.empty((n * c, h * w), grad_y.dtype)
    if gx.size < PARALLEL_MIN:
        _gap_back_planes(g, gx, 0, n * c)
    else:
        _gap_back_par(g, gx)
    return gx.reshape(input_shape)


def _warmup(dt):
    """Compile every kernel above (serial and parallel variants) for dtype ``dt``."""
    x = np.ones((2, 4, 4), dt)
    y, idx = np.empty((2, 2, 2), dt), np.zeros((2, 2, 2), np.int64)
    geom = (2, 2, 2, 2, 0, 0, 1, 1)
    for kernel in (_max_planes, _max_planes_par):
        kernel(x, y, idx, True, *geom)
    for kernel in (_max_back_planes, _max_back_planes_par):
        kernel(y, idx, x, np.zeros(2, np.int64), True)
    for kernel in (_avg_planes, _avg_planes_par):
        kernel(x, y, *geom[:6], True)
    for kernel in (_avg_back_planes, _avg_back_planes_par):
        kernel(y, x, *geom[:6], True)
    x2, g = x.reshape(2, 16), np.ones(2, dt)
    _gap_planes(x2, g, 0, 2)
    _gap_par(x2, g)
    _gap_back_planes(g, x2, 0, 2)
    _gap_back_par(g, x2)

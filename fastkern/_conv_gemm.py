"""Single-threaded packed GEMM pieces for the convolutions.

The conv kernels run one GEMM per (sample, group) inside their own ``prange``
over samples, on operands they pack themselves from the columns, the weights
or the output gradient (so nothing is packed twice), with an epilogue that
writes, accumulates or adds the bias into a strided destination. That is a
different contract from ``gemm_serial`` (plain 2-D arrays in and out), hence
these pieces live here.

Register tile: MR x NR with NR = 32 (two zmm of float32, four of float64) and
MR = 8 for float32 / 4 for float64: 16 zmm accumulators, enough independent
FMA chains to hide latency while leaving registers for the B row and the A
broadcasts. The tile is an ``alloca`` array indexed only by constants after
unrolling, so LLVM keeps it in registers; it needs the SLP vectorizer on at
compile time (``slp_vectorize()``) and ``fastmath={'contract'}`` for FMAs.
No cache blocking over K: per thread, one packed A panel (K x MR) and one B
panel (K x NR) of a conv layer fit L1/L2, and C is written once per tile.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from ._codegen import vector_codegen as slp_vectorize  # noqa: F401  (conv compiles its tiles under it)

NR = 32


def mr_for(dtype) -> int:
    """Rows of the register tile for a dtype."""
    return 8 if dtype.itemsize == 4 else 4


def _make_tile_intrinsic(n):
    @intrinsic
    def tile(typingctx, like):
        arrty = types.Array(like.dtype, 1, "C")

        def codegen(context, builder, sig, args):
            llty = context.get_data_type(like.dtype)
            ptr = cgutils.alloca_once(builder, llty, size=n)
            ary = make_array(arrty)(context, builder)
            itemsize = context.get_abi_sizeof(llty)
            populate_array(
                ary, data=ptr, shape=[context.get_constant(types.intp, n)],
                strides=[context.get_constant(types.intp, itemsize)],
                itemsize=context.get_constant(types.intp, itemsize), meminfo=None,
            )
            return ary._getvalue()

        return arrty(like), codegen

    return tile


_tile8 = _make_tile_intrinsic(8 * NR)
_tile4 = _make_tile_intrinsic(4 * NR)


@njit(fastmath={"contract"}, cache=True)
def _ukernel8(kc, ap, aoff, bp, boff, ct):
    # Offsets are applied by slicing: indices that are provably >= 0 skip numba's
    # negative-index fix-up, which would otherwise stop the vectorizer.
    a = ap[aoff : aoff + kc * 8]
    b = bp[boff : boff + kc * NR]
    acc = _tile8(ap)
    for x in range(8 * NR):
        acc[x] = 0
    for p in range(kc):
        for i in range(8):
            av = a[p * 8 + i]
            for j in range(NR):
                acc[i * NR + j] += av * b[p * NR + j]
    for x in range(8 * NR):
        ct[x] = acc[x]


@njit(fastmath={"contract"}, cache=True)
def _ukernel4(kc, ap, aoff, bp, boff, ct):
    # Offsets are applied by slicing: indices that are provably >= 0 skip numba's
    # negative-index fix-up, which would otherwise stop the vectorizer.
    a = ap[aoff : aoff + kc * 4]
    b = bp[boff : boff + kc * NR]
    acc = _tile4(ap)
    for x in range(4 * NR):
        acc[x] = 0
    for p in range(kc):
        for i in range(4):
            av = a[p * 4 + i]
            for j in range(NR):
                acc[i * NR + j] += av * b[p * NR + j]
    for x in range(4 * NR):
        ct[x] = acc[x]


@njit(inline="always")
def pack_a(a, ap, mr):
    """A (M, K), any strides -> MR-row panels: ``ap[(i // mr) * K * mr + p * mr + i % mr]``, zero-padded."""
    m, k = a.shape
    zero = ap.dtype.type(0)
    for ib in range(0, m, mr):
        base = (ib // mr) * k * mr
        rows = min(mr, m - ib)
        for p in range(k):
            dst = ap[base + p * mr : base + (p + 1) * mr]
            for i in range(rows):
                dst[i] = a[ib + i, p]
            for i in range(rows, mr):
                dst[i] = zero


@njit(inline="always")
def pack_b(b, bp):
    """B (K, N), any strides -> NR-column panels: ``bp[(j // NR) * K * NR + p * NR + j % NR]``, zero-padded."""
    k, n = b.shape
    zero = bp.dtype.type(0)
    for jb in range(0, n, NR):
        base = (jb // NR) * k * NR
        cols = min(NR, n - jb)
        for p in range(k):
            dst = bp[base + p * NR : base + (p + 1) * NR]
            src = b[p, jb : jb + cols]
            for j in range(cols):
                dst[j] = src[j]
            for j in range(cols, NR):
                dst[j] = zero


@njit(inline="always")
def pack_bt(bt, bp):
    """B given as its transpose ``bt`` (N, K), C-contiguous -> the :func:`pack_b` layout of ``bt.T``."""
    n, k = bt.shape
    zero = bp.dtype.type(0)
    for jb in range(0, n, NR):
        base = (jb // NR) * k * NR
        cols = min(NR, n - jb)
        # j outer: each bt row is read contiguously, writes go to NR-strided slots of one panel
        dst = bp[base : base + k * NR]
        for j in range(cols):
            src = bt[jb + j]
            for p in range(k):
                dst[p * NR + j] = src[p]
        for j in range(cols, NR):
            for p in range(k):
                dst[p * NR + j] = zero


@njit(inline="always")
def gemm_packed(ap, bp, m, n, k, mr, c, coff, ldc, accumulate, bias, has_bias, ct):
    """``C = A @ B (+ bias per row)`` or ``C += A @ B`` on packed operands.

    C element (i, j) is ``c[coff + i * ldc + j]`` (flat ``c``), so the result
    can land in a band of a larger array. ``ct`` is an MR*NR scratch tile.
    """
    zero = c.dtype.type(0)
    for jb in range(0, n, NR):
        nr = min(NR, n - jb)
        boff = (jb // NR) * k * NR
        for ib in range(0, m, mr):
            rows = min(mr, m - ib)
            aoff = (ib // mr) * k * mr
            if mr == 8:
                _ukernel8(k, ap, aoff, bp, boff, ct)
            else:
                _ukernel4(k, ap, aoff, bp, boff, ct)
            base = coff + ib * ldc + jb
            if accumulate:
                for i in range(rows):
                    dst = c[base + i * ldc : base + i * ldc + nr]
                    for j in range(nr):
                        dst[j] += ct[i * NR + j]
            else:
                for i in range(rows):
                    dst = c[base + i * ldc : base + i * ldc + nr]
                    bv = bias[ib + i] if has_bias else zero
                    for j in range(nr):
                        dst[j] = ct[i * NR + j] + bv


# ---------------------------------------------------------------------------
# Implicit GEMM for stride-1 convolutions. With the input zero-padded into a
# (C, Hp, Wp) buffer and the output computed on the same "wide" grid of Wp
# columns per row (the last (KW-1)*dW of each row are discarded), row
# (c, kh, kw) of the column matrix is one contiguous run of the flat padded
# input starting at c*Hp*Wp + kh*dH*Wp + kw*dW. So B needs neither im2col nor
# packing: the micro-kernel reads each k step's NR values through a table of
# row offsets.


@njit(fastmath={"contract"}, cache=True)
def _iukernel8(kc, ap, aoff, src, boffs, base, ct):
    acc = _tile8(ap)
    for x in range(8 * NR):
        acc[x] = 0
    for p in range(kc):
        b = src[np.uintp(boffs[p] + base):]
        a = ap[np.uintp(aoff + p * 8):]
        for i in range(8):
            av = a[i]
            for j in range(NR):
                acc[i * NR + j] += av * b[j]
    for x in range(8 * NR):
        ct[x] = acc[x]


@njit(fastmath={"contract"}, cache=True)
def _iukernel4(kc, ap, aoff, src, boffs, base, ct):
    acc = _tile4(ap)
    for x in range(4 * NR):
        acc[x] = 0
    for p in range(kc):
        b = src[np.uintp(boffs[p] + base):]
        a = ap[np.uintp(aoff + p * 4):]
        for i in range(4):
            av = a[i]
            for j in range(NR):
                acc[i * NR + j] += av * b[j]
    for x in range(4 * NR):
        ct[x] = acc[x]


@njit(inline="always")
def gemm_implicit(ap, src, boffs, base, m, k, mr, nw, wp, ow, c, coff, ldc, bias, has_bias, ct):
    """``C = A @ B (+ bias per row)`` with B row p = ``src[base + boffs[p] : ...]`` on the wide grid.

    Wide column ``j`` is output ``(j // wp, j % wp)``; those with ``j % wp >= ow``
    are dropped. C element (i, oh, ow') lands at ``c[coff + i * ldc + oh * ow + ow']``.
    """
    zero = c.dtype.type(0)
    for jb in range(0, nw, NR):
        nr = min(NR, nw - jb)
        for ib in range(0, m, mr):
            rows = min(mr, m - ib)
            aoff = (ib // mr) * k * mr
            if mr == 8:
                _iukernel8(k, ap, aoff, src, boffs, base + jb, ct)
            else:
                _iukernel4(k, ap, aoff, src, boffs, base + jb, ct)
            e = 0
            while e < nr:
                j = jb + e
                oh = j // wp
                x0 = j - oh * wp
                run = min(nr - e, wp - x0)
                valid = min(run, ow - x0)
                if valid > 0:
                    for i in range(rows):
                        bv = bias[ib + i] if has_bias else zero
                        d0 = coff + (ib + i) * ldc + oh * ow + x0
                        dst = c[d0 : d0 + valid]
                        s = ct[i * NR + e : i * NR + e + valid]
                        for q in range(valid):
                            dst[q] = s[q] + bv
                e += run

"""Matrix multiply: ``fastkern.matmul``.

Internal contract used by other kernels (conv, linear):

* ``gemm_into(a, b, out, alpha, beta)``: Python entry, no validation. ``a`` is
  (M, K), ``b`` is (K, N), any strides (transposed views included), same float
  dtype; ``out`` is C-contiguous (M, N). Computes ``out = alpha*a@b + beta*out``
  with all threads.
* ``gemm_serial(a, b, c, alpha, beta)``: a single-threaded ``@njit`` kernel with
  the same meaning, callable from inside other kernels' ``prange`` loops.
* ``tiles_b_rows``, ``tiles_b_panels``, ``tiles_a_rows``, ``dot_tile``: tile
  loops over operands read in place through row-offset tables (conv.py).

Design (BLIS/GotoBLAS layering). Every operand is seen as a flat 1-D buffer
plus an offset and a row and column stride in elements, so one compiled
signature per dtype serves C-ordered, transposed and strided views alike:

* packing: an MC x KC block of A is copied into row micro-panels of MR rows
  (k-major, zero padded), a KC x NC panel of B into column micro-panels of NR
  columns (k-major; an edge panel's extra columns are whatever lies beside B).
  Padding lets the micro-kernel always run a full MR x NR tile; only the
  write-back of an edge tile is masked, so padded columns never reach C.
* micro-kernel: an MR x NR tile accumulated in a stack array that LLVM keeps in
  vector registers (compiled with the SLP vectorizer on and FMA contraction),
  one broadcast of A times NR/16 vector loads of B per k step.
* macro-kernel: loops the micro-kernel over one packed A block and B panel.
* driver: one parallel entry point splits the rows of C (and, when they are
  too few, the columns) among threads; small or skinny shapes whose K fits
  one block, or two when A is short and B row-contiguous, skip packing A
  (the direct path), and outputs of at most one vector of columns use an
  8-row narrow tile. Products below SERIAL_WORK run on a serial driver
  instead: waking the thread pool would cost more than it saves.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

from ._checks import FLOAT_DTYPES, check_no_overlap, check_out, check_scalar
from ._codegen import FMA, vectorized, zeros
from .threads import get_num_threads

_MATMUL_DTYPES = FLOAT_DTYPES
_F32, _F64 = FLOAT_DTYPES

# Block sizes. Registers: an MR x NR tile is 16 zmm accumulators (float32
# 8 x 32, float64 4 x 32), enough independent FMA chains to cover the 4-cycle
# latency at one 512-bit FMA per cycle, with 2-4 B loads + MR broadcasts per k.
# L1d (32 KiB/core): the KC x NR micro-panel of B in use (32 KiB float32 at
# KC=256) is reused by all MC/MR micro-panels of A, which stream from L2.
# L2 (1 MiB/core): the packed MC x KC block of A (128 KiB float32) plus the
# micro-panels of B passing through. L3 (32 MiB, shared): each worker's
# KC x NC panel of B (4 MiB float32). KC also sets how often C is re-read
# (K/KC passes), so it is as large as L1 allows.
# float64 uses KC/2 in the packed path (_k_block): its NR-wide micro-panel
# is twice as wide in bytes.
NR = 32
MR_F32, MR_F64 = 8, 4
KC = 256
MC = 128
NC = 4096
# Serial packing (inside other kernels' loops) uses a smaller B panel so its
# per-call scratch stays small: KC x NC_SERIAL is 128 KiB float32.
NC_SERIAL = 128
# The direct driver (no packing of A) is used when K fits one block and the
# output is narrow or small, and up to DIRECT_MAX_K_BYTES per row of A (float32
# K = 512) when A has at most MC rows (it then stays in L2) and B's rows are
# contiguous (read in place) and at most 1 KiB apart: one pass over C instead
# of one per K block, and no B block packed by every thread (64x400x120: 0.85
# -> 1.06 of OpenBLAS). Longer micro-panels of B, or rows 2 KiB and more apart
# (fewer cache sets), stop fitting the caches (float64 128x512x512 fell from
# 0.99 to 0.46, float32 from 0.95 to 0.83), and transposed B would be packed
# whole by each thread, slower than the blocked path. Below SERIAL_WORK
# multiply-adds one thread is faster than waking the pool: a parallel launch
# costs 3-5 us, what the other core would save on about 500k multiply-adds.
DIRECT_MAX_N = 512
DIRECT_MAX_K_BYTES = 2 * KC * 4
SERIAL_WORK = 1 << 19
# The parallel driver shares out rows (each worker packing the B block of
# every NC x KC phase, one barrier per phase) only when M spans at least
# ROW_SPLIT times as many tiles as N; otherwise column slabs, A packed by each
# worker. A square product has exactly 4x as many row tiles (MR=8, NR=32), so
# it keeps the shared rows. Linear layers' forward GEMMs (N = out_features,
# B = W.T) gained from the column slabs: 64x784x128 0.69 -> 0.89 of OpenBLAS,
# 64x400x120 0.57-0.65 -> 0.70-0.77, 128x4096x256 0.73-0.86 -> 0.81-0.91.
ROW_SPLIT = 4


_FAST = FMA
# Kernels that never allocate are compiled with ``_nrt=False``: no reference
# counting of their array arguments. Otherwise every call of a tile kernel
# increments and decrements each array's refcount, five atomic calls in and
# five out on cache lines both threads write, which measured as half the tile
# loop's time at K <= 64 (and a third at K = 250).


# --------------------------------------------------------------------------- #
# Tiny helpers.

def _tile_rows(x):
    """MR for the dtype of array ``x`` (a compile-time constant)."""


@overload(_tile_rows, inline="always")
def _tile_rows_impl(x):
    mr = MR_F32 if x.dtype == types.float32 else MR_F64
    return lambda x: mr


def _k_block(x):
    """K block of the packed path for the dtype of ``x``: KC float32, KC/2 float64, so the
    KC x NR micro-panel of B is 32 KiB either way and stays in L1 (64 KiB float64 did not)."""


@overload(_k_block, inline="always")
def _k_block_impl(x):
    kc = KC * 32 // x.dtype.bitwidth
    return lambda x: kc


def _stack_array(size_for):
    """An intrinsic ``f(like)``: an uninitialised stack array of ``size_for(like.dtype)`` elements.

    Indexed only with constants after unrolling, LLVM promotes it to registers.
    """
    @intrinsic
    def stack_array(typingctx, like):
        n = size_for(like.dtype)
        arrty = types.Array(like.dtype, 1, "C")

        def codegen(context, builder, sig, args):
            llty = context.get_data_type(like.dtype)
            ptr = cgutils.alloca_once(builder, llty, size=n)
            ary = make_array(arrty)(context, builder)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(llty))
            populate_array(ary, data=ptr, shape=[context.get_constant(types.intp, n)],
                           strides=[itemsize], itemsize=itemsize, meminfo=None)
            return ary._getvalue()

        return arrty(like), codegen

    return stack_array


# The MR x NR accumulators of the micro-kernel.
_register_tile = _stack_array(lambda dt: (MR_F32 if dt == types.float32 else MR_F64) * NR)


@intrinsic
def borrowed(typingctx, arr):
    """``arr`` without its reference count: views of it cost no atomics.

    For the arrays a parallel kernel receives: each slice taken inside its
    loops would otherwise increment and decrement the refcount shared by all
    threads. Only for use while the caller's ``arr`` is alive (a kernel's
    arguments are).
    """
    def codegen(context, builder, sig, args):
        src = make_array(arr)(context, builder, value=args[0])
        src.meminfo = cgutils.get_null_value(src.meminfo.type)
        src.parent = cgutils.get_null_value(src.parent.type)
        return src._getvalue()

    return arr(arr), codegen


@intrinsic
def _flat_view(typingctx, arr, start, length):
    """1-D C view of ``length`` elements of ``arr``'s memory from element offset ``start``
    (relative to ``arr[0, 0]``; negative for negative strides). Borrowed: no refcount."""
    arrty = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        src = make_array(arr)(context, builder, value=args[0])
        ptr = builder.gep(src.data, [args[1]])
        ary = make_array(arrty)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(arr.dtype)))
        populate_array(ary, data=ptr, shape=[args[2]], strides=[itemsize],
                       itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return arrty(arr, types.intp, types.intp), codegen


@intrinsic
def _tail(typingctx, arr, start):
    """``arr[start:]`` of a 1-D C array without the wraparound and clamping a slice costs:
    for offsets known to lie in ``[0, len(arr)]``, in loops where those ten instructions show."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"):
        return None
    arrty = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        src = make_array(arr)(context, builder, value=args[0])
        start = args[1]
        ary = make_array(arrty)(context, builder)
        populate_array(ary, data=builder.gep(src.data, [start]),
                       shape=[builder.sub(builder.extract_value(src.shape, 0), start)],
                       strides=[builder.extract_value(src.strides, 0)],
                       itemsize=src.itemsize, meminfo=None)
        return ary._getvalue()

    return arrty(arr, types.intp), codegen


def _transposer(block_for):
    """An intrinsic ``f(src, soff, sstride, dst, doff, dstride)`` transposing one L x L block,
    L = ``block_for(dtype)``: ``dst[doff + c*dstride + r] = src[soff + r*sstride + c]``.

    L rows are loaded as vectors and swapped in log2(L) rounds of two-input shuffles (each
    round exchanges the off-diagonal halves of 2s x 2s blocks), then stored as vectors:
    (2 + log2 L) / L instructions per element (0.375 at L = 16), where scalar copies took
    about one cycle each.
    LLVM does not find this from scalar code, so it is written in IR. No bounds checks:
    the caller keeps every row of L elements inside both buffers.
    """
    @intrinsic
    def transpose(typingctx, src, soff, sstride, dst, doff, dstride):
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (src, dst)) \
                or src.dtype != dst.dtype:
            return None
        n = block_for(src.dtype)
        idx = types.intp

        def codegen(context, builder, sig, args):
            s_ary = make_array(sig.args[0])(context, builder, value=args[0])
            d_ary = make_array(sig.args[3])(context, builder, value=args[3])
            vptr = llvm_ir.VectorType(context.get_data_type(src.dtype), n).as_pointer()

            def row(ary, off, stride, r):
                at = builder.add(off, builder.mul(stride, context.get_constant(idx, r)))
                return builder.bitcast(builder.gep(ary.data, [at]), vptr)

            rows = [builder.load(row(s_ary, args[1], args[2], r), align=1) for r in range(n)]
            half = n // 2
            while half:
                lo = [j if j & half == 0 else n + j - half for j in range(n)]
                hi = [j + half if j & half == 0 else n + j for j in range(n)]
                masks = [llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), n), m) for m in (lo, hi)]
                for i in range(n):
                    if i & half == 0:
                        a, b = rows[i], rows[i + half]
                        rows[i] = builder.shuffle_vector(a, b, masks[0])
                        rows[i + half] = builder.shuffle_vector(a, b, masks[1])
                half //= 2
            for c in range(n):
                builder.store(rows[c], row(d_ary, args[4], args[5], c), align=1)
            return context.get_dummy_value()

        return types.none(src, idx, idx, dst, idx, idx), codegen

    return transpose


@intrinsic
def _claim(typingctx, counters, slot):
    """Atomically take the next number from ``counters[slot]`` (int64): a work queue for prange."""
    def codegen(context, builder, sig, args):
        ary = make_array(counters)(context, builder, value=args[0])
        ptr = builder.gep(ary.data, [args[1]])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counters, types.intp), codegen


@intrinsic
def _prefetch_write(typingctx, arr, idx):
    """Hint the cache to fetch ``arr[idx]`` for writing (x86 ``prefetchw``)."""

    def codegen(context, builder, sig, args):
        ary = make_array(arr)(context, builder, value=args[0])
        i8p = llvm_ir.IntType(8).as_pointer()
        i32 = llvm_ir.IntType(32)
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(1), i32(3), i32(1)])  # write, keep in all levels, data
        return context.get_dummy_value()

    return types.none(arr, types.intp), codegen


class _MaskedRow:
    """IR helpers of the masked row intrinsics: one vector of ``dtype`` at a time."""

    def __init__(self, context, builder, dtype):
        self.b, self.fty = builder, context.get_data_type(dtype)
        self.vl = vl = 64 * 8 // dtype.bitwidth
        self.vty = llvm_ir.VectorType(self.fty, vl)
        self.i32 = i32 = llvm_ir.IntType(32)
        i1v = llvm_ir.VectorType(llvm_ir.IntType(1), vl)
        suffix = f"v{vl}f{dtype.bitwidth}.p0"
        ptr = self.vty.as_pointer()
        self.store_fn = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [self.vty, ptr, i32, i1v]),
            "llvm.masked.store." + suffix)
        self.load_fn = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(self.vty, [ptr, i32, i1v, self.vty]), "llvm.masked.load." + suffix)

    def splat(self, value, ty):
        one = self.b.insert_element(llvm_ir.Constant(ty, None), value, self.i32(0))
        return self.b.shuffle_vector(one, one, llvm_ir.Constant(llvm_ir.VectorType(self.i32, self.vl), [0] * self.vl))

    def pointer(self, ary, off):
        return self.b.bitcast(self.b.gep(ary.data, [off]), self.vty.as_pointer())

    def mask(self, n):
        """Lanes [0, n) of a vector (all of them when n >= VL)."""
        i64v = llvm_ir.VectorType(llvm_ir.IntType(64), self.vl)
        return self.b.icmp_signed("<", llvm_ir.Constant(i64v, list(range(self.vl))), self.splat(n, i64v))

    def store(self, value, ptr, mask):
        self.b.call(self.store_fn, [value, ptr, self.i32(1), mask])

    def load(self, ptr, mask):
        return self.b.call(self.load_fn, [ptr, self.i32(1), mask, llvm_ir.Constant(self.vty, None)])


def _row_pair(src, dst):
    return (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (src, dst))
            and src.dtype == dst.dtype and isinstance(src.dtype, types.Float))


def _masked_row(extra, body):
    """An intrinsic ``f(dst, doff, src, soff, n, p, q)`` that loads one whole vector of ``src``
    from ``soff`` and has ``body(r, x, ptr, mask, p, q)`` store lanes ``[0, n)`` (all when
    n >= VL) at ``dst[doff:]`` with a masked store; ``extra(dtype)`` types p and q. For row
    write-backs whose width is known only at run time, where a scalar loop cost tens of
    instructions per row. ``src`` must hold a whole vector from ``soff``; ``dst`` is touched
    only in the n lanes."""
    @intrinsic
    def row_op(typingctx, dst, doff, src, soff, n, p, q):
        if not _row_pair(src, dst):
            return None

        def codegen(context, builder, sig, args):
            d_ary = make_array(sig.args[0])(context, builder, value=args[0])
            s_ary = make_array(sig.args[2])(context, builder, value=args[2])
            r = _MaskedRow(context, builder, src.dtype)
            x = builder.load(r.pointer(s_ary, args[3]), align=1)
            body(r, x, r.pointer(d_ary, args[1]), r.mask(args[4]), args[5], args[6])
            return context.get_dummy_value()

        return types.none(dst, types.intp, src, types.intp, types.intp, *extra(src.dtype)), codegen

    return row_op


def _scaled_row(r, x, ptr, mask, alpha, beta):
    y = r.b.fmul(r.splat(alpha, r.vty), x)
    with r.b.if_else(r.b.fcmp_ordered("==", beta, r.fty(0))) as (zero_beta, other):
        with zero_beta:  # C may hold garbage or NaN: never read it
            r.store(y, ptr, mask)
        with other:
            c = r.load(ptr, mask)
            r.store(r.b.fadd(y, r.b.fmul(r.splat(beta, r.vty), c)), ptr, mask)


def _bias_relu_row(r, x, ptr, mask, bias, relu):
    v = r.b.fadd(x, r.splat(bias, r.vty))
    zero = llvm_ir.Constant(r.vty, None)
    clipped = r.b.select(r.b.fcmp_ordered("<", v, zero), zero, v)  # NaN passes, as in torch
    r.store(r.b.select(r.b.icmp_unsigned("!=", relu, llvm_ir.Constant(relu.type, 0)), clipped, v), ptr, mask)


# dst[doff + e] = alpha*src[soff + e] + beta*dst[doff + e] (dst not read when beta == 0)
_store_vector = _masked_row(lambda dt: (dt, dt), _scaled_row)
# dst[doff + e] = src[soff + e] + bias, through ReLU when relu
_bias_relu_vector = _masked_row(lambda dt: (dt, types.boolean), _bias_relu_row)


@njit(inline="always")
def _cdiv(a, b):
    return (a + b - 1) // b


@njit(inline="always")
def _flat_of(x):
    """(flat buffer, offset of x[0, 0], row stride, col stride) of a 2-D array."""
    isz = x.itemsize
    rs = x.strides[0] // isz
    cs = x.strides[1] // isz
    lo = min(0, (x.shape[0] - 1) * rs) + min(0, (x.shape[1] - 1) * cs)
    hi = max(0, (x.shape[0] - 1) * rs) + max(0, (x.shape[1] - 1) * cs)
    return _flat_view(x, lo, hi - lo + 1), -lo, rs, cs


def _flat_np(x):
    """NumPy twin of ``_flat_of``: a 1-D view starting at the lowest address.

    Contiguous operands (the common case) take a cheap ``ravel`` view; ``as_strided``
    costs microseconds, which matter for small products.
    """
    if x.flags.c_contiguous:  # ravel: a view here, and a third of reshape's cost
        return x.ravel(), 0, x.shape[1], 1
    if x.flags.f_contiguous:
        return x.T.ravel(), 0, 1, x.shape[0]
    isz = x.itemsize
    if x.strides[0] % isz or x.strides[1] % isz:
        x = np.ascontiguousarray(x)
        return x.reshape(-1), 0, x.shape[1], 1
    rs, cs = x.strides[0] // isz, x.strides[1] // isz
    i0 = x.shape[0] - 1 if rs < 0 else 0
    j0 = x.shape[1] - 1 if cs < 0 else 0
    span = abs((x.shape[0] - 1) * rs) + abs((x.shape[1] - 1) * cs) + 1
    flat = np.lib.stride_tricks.as_strided(x[i0:, j0:], shape=(span,), strides=(isz,))
    return flat, -(i0 * rs + j0 * cs), rs, cs


# --------------------------------------------------------------------------- #
# Micro-kernel and write-back.

@njit(fastmath=_FAST, cache=True, _nrt=False)
def _micro_kernel(kc, A, aoff, ars, acs, arows, B, boff, boffs, tile, C, coff, crs, alpha, beta, to_c, n_tiles,
                  astep):
    """``n_tiles`` full MR x NR tiles stacked down one NR-column panel of B: tile t is
    ``acc[i, j] = sum_p A[aoff + t*astep + row_a(t*MR + i) + p*acs] * B[boff + row_b(p) + j]``.

    Row offsets are strided or come from a table: ``row_a(r)`` is ``(r % MR)*ars``
    (``arows`` None) or ``arows[r]``; ``row_b(p)`` is ``p*NR`` (``boffs`` None:
    a packed micro-panel) or ``boffs[p]``. The None branches are compiled
    away, so a packed GEMM pays nothing for the tables a convolution uses to
    read the rows of an image in place.

    With ``to_c`` tile t lands directly in a row-contiguous C block (rows
    ``coff + (t*MR + i)*crs``) as ``alpha*acc + beta*C``; otherwise (n_tiles
    1) it is copied to ``tile`` for a masked write-back. A call passes about
    forty words on the stack (each array is seven), as long as a sixth of a
    K = 27 tile's arithmetic: the tiles of one panel share a call. Offsets are
    cast to unsigned so LLVM sees non-negative, consecutive indices (no
    wraparound select), which lets the SLP vectorizer fuse each row update
    into packed FMAs.
    """
    mr = _tile_rows(A)
    acc = _register_tile(A)
    for t in range(n_tiles):
        ao = aoff + t * astep
        co = coff + t * mr * crs
        if to_c:  # C rows are far apart: start fetching them while the tile computes
            for i in range(mr):
                for h in range(0, NR, _lanes(C)):
                    _prefetch_write(C, co + i * crs + h)
        for x in range(mr * NR):
            acc[x] = 0
        if boffs is not None:  # B rows through the table, A strided
            for p in range(kc):
                b = _tail(B, boff + boffs[p])
                for i in range(mr):
                    ai = A[np.uintp(ao + p * acs + i * ars)]
                    for j in range(NR):
                        acc[i * NR + j] += ai * b[j]
        elif arows is None:  # both packed or strided: the GEMM case
            bp = B[np.uintp(boff):]
            for p in range(kc):
                for i in range(mr):
                    ai = A[np.uintp(ao + p * acs + i * ars)]
                    for j in range(NR):
                        acc[i * NR + j] += ai * bp[p * NR + j]
        else:  # A rows through the table, B packed
            bp = B[np.uintp(boff):]
            ar = arows[t * mr:t * mr + mr]
            for p in range(kc):
                for i in range(mr):
                    ai = A[np.uintp(ao + ar[i] + p * acs)]
                    for j in range(NR):
                        acc[i * NR + j] += ai * bp[p * NR + j]
        if not to_c:
            for x in range(mr * NR):
                tile[x] = acc[x]
        elif beta == 0:  # C may hold garbage or NaN: never read it
            for i in range(mr):
                row = _tail(C, co + i * crs)
                for j in range(NR):
                    row[j] = alpha * acc[i * NR + j]
        else:
            for i in range(mr):
                row = _tail(C, co + i * crs)
                for j in range(NR):
                    row[j] = alpha * acc[i * NR + j] + beta * row[j]


@njit(fastmath=_FAST, inline="always")
def _store_tile(tile, ld, i_lo, i_hi, nr, C, coff, crs, ccs, alpha, beta):
    """C[coff + i*crs + j*ccs] = alpha*tile[i*ld + j] + beta*C for tile rows [i_lo, i_hi), cols [0, nr)."""
    if ccs == 1:  # rows contiguous: plain stores (a run-time column stride made LLVM scatter)
        vl = _lanes(C)
        for i in range(i_lo, i_hi):
            for v in range(0, nr, vl):
                _store_vector(C, coff + i * crs + v, tile, i * ld + v, nr - v, alpha, beta)
        return
    for i in range(i_lo, i_hi):
        row = coff + i * crs
        if beta == 0:  # C may hold garbage or NaN: never read it
            for j in range(nr):
                C[row + j * ccs] = alpha * tile[i * ld + j]
        else:
            for j in range(nr):
                C[row + j * ccs] = alpha * tile[i * ld + j] + beta * C[row + j * ccs]


# --------------------------------------------------------------------------- #
# Narrow tile: outputs with at most one vector of columns (a CNN's first
# layers, N = 6 or 16 channels) waste most of an NR-wide tile. NARROW_MR rows
# x one vector instead: NARROW_MR broadcasts and one load of B per step, so the
# work per row falls by NR / lanes. Eight accumulators cover the FMA latency
# (4 cycles x 2 per cycle); at 16 rows LLVM vectorized the row loop instead,
# left the accumulators in memory and gathered them, 5x slower.
NARROW_MR = 8

_narrow_registers = _stack_array(lambda dt: NARROW_MR * (64 * 8 // dt.bitwidth))


@njit(fastmath=_FAST, inline="always")
def _column_tiles(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta,
                  acc, rows, width, ld):
    """Rows [i_lo, i_hi) x cols [0, n) of ``A[aoff + i*ars + p*acs] @ bp`` (A has m >= ``rows``
    rows) by rows x ``width`` tiles, row i's accumulators at ``acc[i*ld:]``; a ragged last
    tile is shifted up to end at row m.

    ``bp`` is a packed NR-wide B micro-panel (only its first ``width`` columns
    are read); n <= width. ``tile`` (>= rows * ld) takes the accumulators for
    the masked write-back, which indexes at run time. The tiles share one call:
    its arguments cost as much as a short tile's steps.
    """
    for ir in range(i_lo, i_hi, rows):
        i0 = min(ir, m - rows)
        ao = aoff + i0 * ars
        for x in range(rows * ld):
            acc[x] = 0
        for p in range(kc):
            for i in range(rows):
                ai = A[np.uintp(ao + p * acs + i * ars)]
                for j in range(width):
                    acc[i * ld + j] += ai * bp[p * NR + j]
        for x in range(rows * ld):
            tile[x] = acc[x]
        _store_tile(tile, ld, ir - i0, min(ir + rows, i_hi) - i0, n, C, coff + i0 * crs, crs, ccs, alpha, beta)


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _micro_kernel_narrow(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta):
    """_column_tiles by NARROW_MR x lanes tiles (n <= lanes)."""
    _column_tiles(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta,
                  _narrow_registers(A), NARROW_MR, _lanes(A), _lanes(A))


# Half-width tile: at most half a vector of columns (N <= 8 in float32). These cores issue two
# 256-bit FMAs a cycle where they issue one 512-bit one, so half vectors take half the time a
# row spends in the FMAs (36864x25x6 on one core: 9.5 -> 6.4 ns a row). HALF_MR = 12 accumulators
# cover the FMA latency; each sits in its own 512-bit slot of the stack array, because packed side
# by side (or at 8 or 16 rows) LLVM fused pairs of rows into 512-bit FMAs and ran slower than
# the full-width tile.
HALF_MR = 12

_half_registers = _stack_array(lambda dt: HALF_MR * (64 * 8 // dt.bitwidth))


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _micro_kernel_half(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta):
    """_column_tiles by HALF_MR x lanes/2 tiles (n <= lanes/2)."""
    _column_tiles(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta,
                  _half_registers(A), HALF_MR, _lanes(A) // 2, _lanes(A))


# 1.5-vector tile: an edge panel of B up to 1.5 vectors wide (the last 20 of 84 columns), as
# one full and one half vector a row, three of the four 256-bit FMAs of a full NR-wide tile.
_wide_registers = _stack_array(lambda dt: NARROW_MR * 2 * (64 * 8 // dt.bitwidth))


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _micro_kernel_wide(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta):
    """_column_tiles by NARROW_MR x 1.5 lanes tiles (n <= 1.5 lanes)."""
    _column_tiles(kc, A, aoff, ars, acs, bp, tile, C, coff, crs, ccs, n, m, i_lo, i_hi, alpha, beta,
                  _wide_registers(A), NARROW_MR, _lanes(A) * 3 // 2, 2 * _lanes(A))


# --------------------------------------------------------------------------- #
# Inner-product tile: C += A @ B.T with both operands' rows contiguous along
# the reduction, so neither is packed or transposed. It serves products whose
# output is too narrow for an NR-wide tile (a convolution's weight gradient
# with few output channels). DOT_R x DOT_S accumulators of one vector each
# (16 zmm), DOT_R + DOT_S loads per DOT_R * DOT_S FMAs; the lanes are summed
# once, after the last call, not per tile. A 3 x 5 tile (15 zmm, 8 loads per
# 15 FMAs) covers 6 x 25 (LeNet-5's first layer: 6 channels, 5x5 taps) exactly,
# where 4 x 4 tiles compute 8 x 28 (1.49x the work).
DOT_R, DOT_S = 4, 4
DOT_SHAPES = ((DOT_R, DOT_S), (3, 5))


def _lanes(x):
    """Vector lanes (one 64-byte register) for the dtype of array ``x`` (a compile-time constant)."""


@overload(_lanes, inline="always")
def _lanes_impl(x):
    vl = 64 // x.dtype.bitwidth * 8
    return lambda x: vl


_dot_registers = _stack_array(lambda dt: DOT_R * DOT_S * (64 * 8 // dt.bitwidth))


@njit(fastmath=_FAST, cache=True, _nrt=False)
def dot_tile(nvec, n_runs, A, aoffs, astep, B, boffs, bstep, P, poff):
    """``P[poff + (r*DOT_S + s)*VL + e] +=``
    ``sum_u,v A[aoffs[r] + u*astep + v*VL + e] * B[boffs[s] + u*bstep + v*VL + e]``.

    The reduction is ``n_runs`` runs (u) of ``nvec`` vectors of VL lanes,
    ``astep`` and ``bstep`` apart: several samples of a convolution at once,
    so the accumulators are loaded from P and stored back once for all of
    them, not once per short run. P keeps per-lane partial sums (sum them
    over the last axis for C). The eight row views are named once per run,
    outside the vector loop, so their bases stay in registers and every index
    is provably non-negative.
    """
    vl = _lanes(A)
    acc = _dot_registers(A)
    tile = P[np.uintp(poff):]
    for x in range(DOT_R * DOT_S * vl):
        acc[x] = tile[x]
    for u in range(n_runs):
        da, db = u * astep, u * bstep
        a0, a1 = A[np.uintp(aoffs[0] + da):], A[np.uintp(aoffs[1] + da):]
        a2, a3 = A[np.uintp(aoffs[2] + da):], A[np.uintp(aoffs[3] + da):]
        b0, b1 = B[np.uintp(boffs[0] + db):], B[np.uintp(boffs[1] + db):]
        b2, b3 = B[np.uintp(boffs[2] + db):], B[np.uintp(boffs[3] + db):]
        for v in range(nvec):
            o = v * vl
            for e in range(vl):
                x0, x1, x2, x3 = a0[o + e], a1[o + e], a2[o + e], a3[o + e]
                y0, y1, y2, y3 = b0[o + e], b1[o + e], b2[o + e], b3[o + e]
                acc[0 * vl + e] += x0 * y0
                acc[1 * vl + e] += x0 * y1
                acc[2 * vl + e] += x0 * y2
                acc[3 * vl + e] += x0 * y3
                acc[4 * vl + e] += x1 * y0
                acc[5 * vl + e] += x1 * y1
                acc[6 * vl + e] += x1 * y2
                acc[7 * vl + e] += x1 * y3
                acc[8 * vl + e] += x2 * y0
                acc[9 * vl + e] += x2 * y1
                acc[10 * vl + e] += x2 * y2
                acc[11 * vl + e] += x2 * y3
                acc[12 * vl + e] += x3 * y0
                acc[13 * vl + e] += x3 * y1
                acc[14 * vl + e] += x3 * y2
                acc[15 * vl + e] += x3 * y3
    for x in range(DOT_R * DOT_S * vl):
        tile[x] = acc[x]


@njit(fastmath=_FAST, cache=True, _nrt=False)
def dot_tile_3x5(nvec, n_runs, A, aoffs, astep, B, boffs, bstep, P, poff):
    """:func:`dot_tile` for a 3 x 5 tile: ``P[poff + (r*5 + s)*VL + e]`` for r < 3, s < 5."""
    vl = _lanes(A)
    acc = _dot_registers(A)
    tile = P[np.uintp(poff):]
    for x in range(15 * vl):
        acc[x] = tile[x]
    for u in range(n_runs):
        da, db = u * astep, u * bstep
        a0, a1, a2 = A[np.uintp(aoffs[0] + da):], A[np.uintp(aoffs[1] + da):], A[np.uintp(aoffs[2] + da):]
        b0, b1 = B[np.uintp(boffs[0] + db):], B[np.uintp(boffs[1] + db):]
        b2, b3, b4 = B[np.uintp(boffs[2] + db):], B[np.uintp(boffs[3] + db):], B[np.uintp(boffs[4] + db):]
        for v in range(nvec):
            o = v * vl
            for e in range(vl):
                x0, x1, x2 = a0[o + e], a1[o + e], a2[o + e]
                y0, y1, y2, y3, y4 = b0[o + e], b1[o + e], b2[o + e], b3[o + e], b4[o + e]
                acc[0 * vl + e] += x0 * y0
                acc[1 * vl + e] += x0 * y1
                acc[2 * vl + e] += x0 * y2
                acc[3 * vl + e] += x0 * y3
                acc[4 * vl + e] += x0 * y4
                acc[5 * vl + e] += x1 * y0
                acc[6 * vl + e] += x1 * y1
                acc[7 * vl + e] += x1 * y2
                acc[8 * vl + e] += x1 * y3
                acc[9 * vl + e] += x1 * y4
                acc[10 * vl + e] += x2 * y0
                acc[11 * vl + e] += x2 * y1
                acc[12 * vl + e] += x2 * y2
                acc[13 * vl + e] += x2 * y3
                acc[14 * vl + e] += x2 * y4
    for x in range(15 * vl):
        tile[x] = acc[x]


# --------------------------------------------------------------------------- #
# Packing.

_mr_registers = _stack_array(lambda dt: MR_F32 if dt == types.float32 else MR_F64)
_transpose_mr = _transposer(lambda dt: MR_F32 if dt == types.float32 else MR_F64)
_transpose_lanes = _transposer(lambda dt: 64 * 8 // dt.bitwidth)


@njit(cache=True, _nrt=False)
def _pack_a(A, aoff, ars, acs, mc, kc, buf, mr):
    """Rows [0, mc) x cols [0, kc) of A (from aoff) into MR-row micro-panels, zero padded.

    Offsets go through unsigned slices so LLVM sees non-negative, consecutive
    indices (no wraparound selects) and can vectorize the copies.
    """
    for q in range(_cdiv(mc, mr)):
        rows = min(mr, mc - q * mr)
        panel = buf[q * mr * kc:]
        if acs == 1 and rows == mr and mr == _tile_rows(A):  # rows of A contiguous: MR x MR transposes
            base = aoff + q * mr * ars
            whole = kc - kc % mr
            for p in range(0, whole, mr):
                _transpose_mr(A, base + p, ars, panel, p * mr, mr)
            for p in range(whole, kc):
                dst = panel[np.uintp(p * mr):]
                for i in range(mr):
                    dst[i] = A[np.uintp(base + i * ars + p)]
        elif acs == 1:
            for i in range(rows):
                src = A[np.uintp(aoff + (q * mr + i) * ars):]
                for p in range(kc):
                    panel[p * mr + i] = src[p]
        elif ars == 1 and rows == mr and mr == _tile_rows(A):  # transposed A: MR contiguous values per k
            mrc = _tile_rows(A)  # a constant: the copies unroll
            reg = _mr_registers(A)  # loads before stores, which LLVM may not reorder: one vector each
            for p in range(kc):
                src = _tail(A, aoff + q * mrc + p * acs)
                for i in range(mrc):
                    reg[i] = src[i]
                dst = _tail(panel, p * mrc)
                for i in range(mrc):
                    dst[i] = reg[i]
        elif ars == 1:
            for p in range(kc):
                src = A[np.uintp(aoff + q * mr + p * acs):]
                dst = panel[p * mr:]
                for i in range(rows):
                    dst[i] = src[i]
        else:
            for i in range(rows):
                for p in range(kc):
                    panel[p * mr + i] = A[np.uintp(aoff + (q * mr + i) * ars + p * acs)]
        for i in range(rows, mr):
            for p in range(kc):
                panel[p * mr + i] = 0


_row_registers = _stack_array(lambda dt: NR)


@njit(cache=True, _nrt=False)
def _pack_b_panel(B, boff, brs, bcs, kc, nr, buf, dst):
    """kc x nr block of B (from boff) into one k-major NR-wide micro-panel.

    Columns past nr are never stored to C (edge tiles are written back
    masked), so with row-contiguous B they hold whatever follows in B's
    buffer: a fixed NR-wide copy, where copying nr and zeroing the rest cost
    4 us on a 120 x 20 edge panel. Only rows at the buffer's end are zero padded.
    """
    panel = buf[dst:]
    if bcs == 1:
        for p in range(kc):
            s = boff + p * brs
            src = _tail(B, s)
            row = _tail(panel, p * NR)
            if s + NR <= B.shape[0]:
                reg = _row_registers(B)  # all loads before the stores: B and buf may alias for LLVM
                for j in range(NR):
                    reg[j] = src[j]
                for j in range(NR):
                    row[j] = reg[j]
            else:
                for j in range(nr):
                    row[j] = src[j]
                for j in range(nr, NR):
                    row[j] = 0
    elif brs == 1 and nr == NR:  # transposed B, a whole panel: lanes x lanes transposes
        vl = _lanes(B)
        whole = kc - kc % vl
        for p in range(0, whole, vl):
            for j in range(0, NR, vl):
                _transpose_lanes(B, boff + j * bcs + p, bcs, panel, p * NR + j, NR)
        for j in range(NR):
            src = B[np.uintp(boff + j * bcs):]
            for p in range(whole, kc):
                panel[p * NR + j] = src[p]
    else:  # strided B or a transposed edge panel: walk down its columns
        for j in range(nr):
            src = B[np.uintp(boff + j * bcs):]
            if brs == 1:
                for p in range(kc):
                    panel[p * NR + j] = src[p]
            else:
                for p in range(kc):
                    panel[p * NR + j] = src[np.uintp(p * brs)]
        for p in range(kc):
            for j in range(nr, NR):
                panel[p * NR + j] = 0


@njit(cache=True, _nrt=False)
def _pack_b(B, boff, brs, bcs, kc, nc, buf):
    for q in range(_cdiv(nc, NR)):
        _pack_b_panel(B, boff + q * NR * bcs, brs, bcs, kc, min(NR, nc - q * NR), buf, q * NR * kc)


# --------------------------------------------------------------------------- #
# Macro-kernel and drivers.

@njit(fastmath=_FAST, cache=True, _nrt=False)
def _macro_kernel(ap, bp, bpoff, kc, mc, nc, C, coff, crs, ccs, alpha, beta):
    """C block (mc x nc at coff) = alpha * packed A block @ packed B panel + beta * C."""
    mr = _tile_rows(ap)
    tile = _register_tile(ap)
    for jr in range(0, nc, NR):
        nr = min(NR, nc - jr)
        ir = 0
        while ir < mc:  # the panel's whole tiles straight into C in one call, then a ragged one
            n_full = mc // mr - ir // mr if ccs == 1 and nr == NR else 0
            nt = max(n_full, 1)
            cij = coff + ir * crs + jr * ccs
            _micro_kernel(kc, ap, ir * kc, 1, mr, None, bp, bpoff + jr * kc, None, tile, C, cij, crs,
                          alpha, beta, n_full > 0, nt, mr * kc)
            if n_full == 0:
                _store_tile(tile, NR, 0, min(mr, mc - ir), nr, C, cij, crs, ccs, alpha, beta)
            ir += nt * mr


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _macro_kernel_packing(ap, B, boff, brs, bcs, kc, mc, nc, bp, C, coff, crs, ccs, alpha, beta):
    """:func:`_macro_kernel` over B unpacked: each NR-column micro-panel of B is packed into
    ``bp`` and used by every tile of the column at once, while it is in L1. For A of at most
    MC rows (a linear layer's batch), where packing the whole KC x NC panel of B first wrote
    and re-read a panel larger than L2 (128x256x4096: 4 MiB) for only mc/MR tiles per panel."""
    for jr in range(0, nc, NR):
        nr = min(NR, nc - jr)
        _pack_b_panel(B, boff + jr * bcs, brs, bcs, kc, nr, bp, 0)
        _macro_kernel(ap, bp, 0, kc, mc, nr, C, coff + jr * ccs, crs, ccs, alpha, beta)


# --------------------------------------------------------------------------- #
# Tile loops over operands read in place, for the convolutions. C is their
# scratch buffer, padded to whole MR x NR tiles, so every tile is stored
# straight from registers; rows and columns past m and n are don't-cares.

@njit(cache=True, _nrt=False)
def _channel_panel(dyw, base, ld, n_ch, ncol, pan):
    """``pan[l*NR + c] = dyw[base + c*ld + l]`` for l < ncol, c < NR (zero past n_ch channels): an
    NR-channel panel of grad_y, transposed in lanes x lanes register blocks where whole."""
    vl = _lanes(dyw)
    zero = dyw.dtype.type(0)
    whole_l = ncol - ncol % vl
    for c0 in range(0, NR, vl):
        if c0 + vl <= n_ch:
            for l0 in range(0, whole_l, vl):
                _transpose_lanes(dyw, base + c0 * ld + l0, ld, pan, l0 * NR + c0, NR)
            lo = whole_l
        else:
            lo = 0
        for l in range(lo, ncol):
            dst = _tail(pan, l * NR + c0)
            for c in range(vl):
                dst[c] = dyw[base + (c0 + c) * ld + l] if c0 + c < n_ch else zero


@njit(fastmath=_FAST, cache=True, _nrt=False)
def tiles_b_rows(m, n, k, ap, B, bbase, boffs, C, crs, tile):
    """C = packed A (m x k) @ B, with B row p at ``B[bbase + boffs[p]:]``, any offsets.

    ``ap`` holds A in MR-row micro-panels over the whole k (``_pack_a`` with
    kc = k). B rows must be readable up to n rounded up to NR.
    """
    mr = _tile_rows(ap)
    one = C.dtype.type(1)
    kb = _cdiv(k, _cdiv(k, KC))  # equal K blocks: no short last pass over C
    for pc in range(0, k, kb):
        kc = min(kb, k - pc)
        beta = C.dtype.type(0) if pc == 0 else one
        bo = boffs[pc:pc + kc]
        for jr in range(0, n, NR):
            _micro_kernel(kc, ap, pc * mr, 1, mr, None, B, bbase + jr, bo, tile,
                          C, jr, crs, one, beta, True, _cdiv(m, mr), mr * k)


@njit(fastmath=_FAST, cache=True, _nrt=False)
def tiles_b_panels(m, n, k, ap, bp, bbase, pstride, C, crs, tile):
    """C = packed A (m x k) @ packed B: B panel q (k x NR, k-major) at ``bp[bbase + q*pstride:]``."""
    mr = _tile_rows(ap)
    one = C.dtype.type(1)
    kb = _cdiv(k, _cdiv(k, KC))
    for pc in range(0, k, kb):
        kc = min(kb, k - pc)
        beta = C.dtype.type(0) if pc == 0 else one
        for jr in range(0, n, NR):
            _micro_kernel(kc, ap, pc * mr, 1, mr, None, bp, bbase + (jr // NR) * pstride + pc * NR,
                          None, tile, C, jr, crs, one, beta, True, _cdiv(m, mr), mr * k)


@njit(fastmath=_FAST, cache=True, _nrt=False)
def tiles_a_rows(m, n, k, A, abase, arows, bp, C, crs, tile):
    """C += A @ packed B, with A row i at ``A[abase + arows[i]:]``, any offsets.

    ``bp`` holds B (k x n) in NR-column micro-panels over the whole k (panel
    q at q*k*NR, zero padded); ``arows`` has m rounded up to MR entries.
    """
    mr = _tile_rows(A)
    one = C.dtype.type(1)
    kb = _cdiv(k, _cdiv(k, KC))
    for pc in range(0, k, kb):
        kc = min(kb, k - pc)
        for jr in range(0, n, NR):
            _micro_kernel(kc, A, abase + pc, 0, 1, arows, bp, jr * k + pc * NR, None,
                          tile, C, jr, crs, one, one, True, _cdiv(m, mr), 0)


@njit(inline="always")
def _in_place_cols(n, bcs):
    """Columns of B the direct path reads in place: whole NR tiles of a row-contiguous B."""
    return n // NR * NR if bcs == 1 else 0


@njit(cache=True, _nrt=False)
def _direct_pack(B, boff, brs, bcs, k, n, bp, rows):
    """Prepare B for _direct_rows: pack the columns it cannot read in place (from
    ``_in_place_cols``), and fill ``rows`` (2k entries) with the offsets of B's rows
    and then of the packed micro-panels' rows."""
    n0 = _in_place_cols(n, bcs)
    if n0 < n:
        _pack_b(B, boff + n0 * bcs, brs, bcs, k, n - n0, bp)
    for p in range(k):
        rows[p] = p * brs
        rows[k + p] = p * NR


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _direct_rows(i_lo, i_hi, m, n, k, A, aoff, ars, acs, B, boff, bcs, brows, bp, C, coff, crs, ccs, alpha, beta):
    """Rows [i_lo, i_hi) of C from unpacked A and B (shapes of _use_direct), prepared by _direct_pack.

    Whole NR-column tiles of a row-contiguous B are read in place through the
    row offsets ``brows[:k]``, as every row block reuses them from L1; the
    rest of B comes packed in ``bp``, its rows at ``brows[k:]``. Packing all
    of B cost a quarter of a 100^3 product, and each thread packed it again.
    A ragged last row block is shifted up to end at row m (all rows valid,
    nothing to pad); only its new rows are written.
    """
    mr = _tile_rows(A)
    vl = _lanes(A)
    tile = _register_tile(A)
    n0 = _in_place_cols(n, bcs)
    for jr in range(0, n, NR):
        nr = min(NR, n - jr)
        # one call site for both sources: each inlined copy of the tile costs seconds of compile
        src, off, rows = (B, boff + jr, brows[:k]) if jr < n0 else (bp, (jr - n0) * k, brows[k:])
        if nr <= 3 * vl // 2 and m >= NARROW_MR:  # a panel narrower than the tile (packed): a narrower tile
            args = (k, A, aoff, ars, acs, bp[off:], tile, C, coff + jr * ccs, crs, ccs, nr, m, i_lo, i_hi, alpha, beta)
            if nr <= vl // 2 and m >= HALF_MR:
                _micro_kernel_half(*args)
            elif nr <= vl:
                _micro_kernel_narrow(*args)
            else:
                _micro_kernel_wide(*args)
            continue
        ir = i_lo
        while ir < i_hi:  # whole tiles straight into C in one call, then a ragged one
            n_full = (i_hi - ir) // mr if ccs == 1 and nr == NR else 0
            nt = max(n_full, 1)
            i0 = min(ir, m - mr)  # a ragged last block shifted up to end at row m
            cij = coff + i0 * crs + jr * ccs
            _micro_kernel(k, A, aoff + i0 * ars, ars, acs, None, src, off, rows, tile, C, cij, crs,
                          alpha, beta, n_full > 0, nt, mr * ars)
            if n_full == 0:
                _store_tile(tile, NR, ir - i0, min(ir + mr, i_hi) - i0, nr, C, cij, crs, ccs, alpha, beta)
            ir += nt * mr


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _scale(C, coff, crs, ccs, m, n, beta):
    for i in range(m):
        for j in range(n):
            idx = coff + i * crs + j * ccs
            C[idx] = 0 if beta == 0 else beta * C[idx]


@njit(inline="always")
def _direct_shape(m, n, k, mr, itemsize, brs, bcs):
    """Whether the direct path takes the product (also called from Python, as ``.py_func``)."""
    return m >= mr and n <= DIRECT_MAX_N and (
        k <= KC or (k * itemsize <= DIRECT_MAX_K_BYTES and m <= MC and bcs == 1
                    and abs(brs) * itemsize <= DIRECT_MAX_K_BYTES // 2))


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _use_direct(m, n, k, A, brs, bcs):
    return _direct_shape(m, n, k, _tile_rows(A), A.itemsize, brs, bcs)


@njit(inline="always")
def _serial_scratch(m, n, k, mr, kb, direct):
    """Lengths of the (A, B, row offsets) scratch of _gemm_flat_serial (also called from
    Python, as ``.py_func``): B packed whole and 2k row offsets on the direct path, an A block
    and a B panel otherwise."""
    if direct:
        return 0, k * -(-n // NR) * NR, 2 * k
    kcm = min(k, kb)
    return -(-min(m, MC) // mr) * mr * kcm, -(-min(n, NC_SERIAL) // NR) * NR * kcm, 0


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _gemm_flat_serial(m, n, k, A, aoff, ars, acs, B, boff, brs, bcs, C, coff, crs, ccs,
                      alpha, beta, ap, bp, brows):
    """Single-threaded GEMM on flat operands, with scratch of the _serial_scratch lengths from
    the caller (Python keeps it between calls: allocating it here cost 3-8 us per small call)."""
    if k == 0:
        _scale(C, coff, crs, ccs, m, n, beta)
        return
    if _use_direct(m, n, k, A, brs, bcs):
        _direct_pack(B, boff, brs, bcs, k, n, bp, brows)
        _direct_rows(0, m, m, n, k, A, aoff, ars, acs, B, boff, bcs, brows, bp, C, coff, crs, ccs, alpha, beta)
        return
    _gemm_packed(m, n, k, A, aoff, ars, acs, B, boff, brs, bcs, C, coff, crs, ccs,
                 alpha, beta, ap, bp, NC_SERIAL)


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _gemm_packed(m, n, k, A, aoff, ars, acs, B, boff, brs, bcs, C, coff, crs, ccs,
                 alpha, beta, ap, bp, nc_max):
    """The blocked loops on one thread: B panels of KC x nc_max, A blocks of MC x KC."""
    mr = _tile_rows(A)
    kb = _k_block(A)
    for jc in range(0, n, nc_max):
        nc = min(nc_max, n - jc)
        for pc in range(0, k, kb):
            kc = min(kb, k - pc)
            bt = beta if pc == 0 else C.dtype.type(1)
            if m <= MC:  # one block of A: each micro-panel of B packed just before its tiles use it
                _pack_a(A, aoff + pc * acs, ars, acs, m, kc, ap, mr)
                _macro_kernel_packing(ap, B, boff + pc * brs + jc * bcs, brs, bcs, kc, m, nc, bp, C,
                                      coff + jc * ccs, crs, ccs, alpha, bt)
                continue
            _pack_b(B, boff + pc * brs + jc * bcs, brs, bcs, kc, nc, bp)
            for ic in range(0, m, MC):
                mc = min(MC, m - ic)
                _pack_a(A, aoff + ic * ars + pc * acs, ars, acs, mc, kc, ap, mr)
                _macro_kernel(ap, bp, 0, kc, mc, nc, C, coff + ic * crs + jc * ccs,
                              crs, ccs, alpha, bt)


@njit(fastmath=_FAST, cache=True, _nrt=False)
def _claimed_row_blocks(claims, phase, ub, m, n, jc, nc, pc, kc, A, aoff, ars, acs, B, boff, brs, bcs, C,
                        alpha, beta, ap, bp):
    """One worker's share of a (jc, pc) block of C = A @ B: B's block packed, then row blocks
    of ``ub`` rows taken from the shared counter until none are left."""
    mr = _tile_rows(A)
    _pack_b(B, boff + pc * brs + jc * bcs, brs, bcs, kc, nc, bp)
    while True:
        ic = _claim(claims, phase) * ub
        if ic >= m:
            return
        mc = min(ub, m - ic)
        _pack_a(A, aoff + ic * ars + pc * acs, ars, acs, mc, kc, ap, mr)
        _macro_kernel(ap, bp, 0, kc, mc, nc, C, ic * n + jc, n, 1, alpha, beta)


@njit(fastmath=_FAST, parallel=True, cache=True)
def _gemm_flat_parallel(m, n, k, A, aoff, ars, acs, B, boff, brs, bcs, C, alpha, beta,
                        abufs, bbufs, nthreads):
    """GEMM on ``nthreads`` threads into C-contiguous flat C (m x n); k >= 1.

    The blocked loops go over (NC-column, KC-deep) blocks of C in turn; in
    each, every worker packs the block's B and then takes blocks of rows from
    a shared atomic counter until none are left. Rows are handed out as they
    are asked for, not split in fixed halves, because a core shared with
    another process then does less of the work instead of holding up the
    other. Which worker computes a row block does not change its arithmetic,
    so results stay deterministic. Packing B once per worker costs K*N
    copies, small next to the 2*M*N*K flops.

    Unless M spans at least ROW_SPLIT tiles per tile of N (or on one thread),
    each worker owns a fixed slab of columns (rows) and runs the whole
    blocked loop on it: B is then packed once in total, and there is no
    barrier per block. Small or skinny shapes whose K fits one block
    take the direct path: B packed whole, rows of A read in place. One entry
    point serves every shape and thread count, so a first call compiles one
    driver, not three.
    """
    mr = _tile_rows(A)
    direct = _use_direct(m, n, k, A, brs, bcs)
    by_rows = direct or _cdiv(m, mr) >= ROW_SPLIT * _cdiv(n, NR)
    shared = by_rows and not direct and nthreads > 1
    kb = _k_block(A)
    n_kc = _cdiv(k, kb)
    n_phases = _cdiv(n, NC) * n_kc if shared else 1
    ub = min(MC, _cdiv(_cdiv(m, 4 * nthreads), mr) * mr)  # at least 4 row blocks per worker
    claims = zeros(n_phases, np.int64)
    brows = np.empty((nthreads, 2 * k if direct else 0), np.int64)  # each worker's B row offsets
    one = C.dtype.type(1)
    unit = NARROW_MR if direct else mr if by_rows else NR
    units = _cdiv(m if by_rows else n, unit)
    per = _cdiv(units, nthreads) * unit
    for phase in range(n_phases):
        jc = (phase // n_kc) * NC
        pc = (phase % n_kc) * kb
        for w in prange(nthreads):
            lo = w * per
            if shared:
                _claimed_row_blocks(claims, phase, ub, m, n, jc, min(NC, n - jc), pc, min(kb, k - pc),
                                    A, aoff, ars, acs, B, boff, brs, bcs, C, alpha, beta if pc == 0 else one,
                                    abufs[w], bbufs[w])
            elif direct and lo < m:
                _direct_pack(B, boff, brs, bcs, k, n, bbufs[w], brows[w])
                _direct_rows(lo, min(m, lo + per), m, n, k, A, aoff, ars, acs, B, boff, bcs, brows[w], bbufs[w],
                             C, 0, n, 1, alpha, beta)
            elif by_rows and lo < m:
                _gemm_packed(min(per, m - lo), n, k, A, aoff + lo * ars, ars, acs, B, boff, brs, bcs,
                             C, lo * n, n, 1, alpha, beta, abufs[w], bbufs[w], NC)
            elif not by_rows and lo < n:
                _gemm_packed(m, min(per, n - lo), k, A, aoff, ars, acs, B, boff + lo * bcs, brs, bcs,
                             C, lo, n, 1, alpha, beta, abufs[w], bbufs[w], NC)


@njit(cache=True, nogil=True)
def gemm_serial(a, b, c, alpha, beta):
    """``c = alpha * a @ b + beta * c`` on one thread, for use inside other kernels."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    fa, aoff, ars, acs = _flat_of(a)
    fb, boff, brs, bcs = _flat_of(b)
    fc, coff, crs, ccs = _flat_of(c)
    na, nb, nrows = _serial_scratch(m, n, k, _tile_rows(a), _k_block(a), _use_direct(m, n, k, fa, brs, bcs))
    _gemm_flat_serial(m, n, k, fa, aoff, ars, acs, fb, boff, brs, bcs, fc, coff, crs, ccs,
                      alpha, beta, np.empty(na, a.dtype), np.empty(nb, a.dtype), np.empty(nrows, np.int64))


for _d in (gemm_serial, _gemm_flat_parallel, _claimed_row_blocks, _gemm_flat_serial, _gemm_packed, _macro_kernel,
           _macro_kernel_packing, _direct_rows, _micro_kernel, dot_tile, dot_tile_3x5, _pack_a, _pack_b_panel, _pack_b,
           _direct_pack,
           tiles_b_rows, tiles_b_panels, tiles_a_rows, _micro_kernel_narrow, _micro_kernel_half,
           _micro_kernel_wide, _channel_panel):
    vectorized(_d)


# --------------------------------------------------------------------------- #
# Python side: reusable workspaces, dispatch, public API.

# Per shape, how gemm_into runs it: made once (the dispatch decisions and workspace lookups
# cost 1 us of Python, a tenth of a 64x120x84 product) and kept until a workspace grows.
_PLANS: dict = {}
_MAX_PLANS = 256
# The plans of C-contiguous operands again, keyed with alpha and beta and holding their kernel
# scalars too, so that the common call skips the rest of the lookup.
_CONTIGUOUS_PLANS: dict = {}


def _clear_plans():
    _PLANS.clear()
    _CONTIGUOUS_PLANS.clear()


_WORKSPACES: dict = {}


def _workspace(dtype, a_elems, b_elems):
    """Per-dtype packing buffers, kept between calls and grown on demand.

    Kernels hold the GIL while they run, so calls from several Python threads
    use the buffers one after another.
    """
    abufs, bbufs = _WORKSPACES.get(dtype, (None, None))
    if abufs is not None and abufs.shape[1] >= a_elems and bbufs.shape[1] >= b_elems:
        return abufs, bbufs  # the steady state
    nthreads = numba.config.NUMBA_NUM_THREADS
    if abufs is None or abufs.shape[1] < a_elems:
        abufs = np.empty((nthreads, max(a_elems, 1)), dtype)
    if bbufs is None or bbufs.shape[1] < b_elems:
        bbufs = np.empty((nthreads, max(b_elems, 1)), dtype)
    _WORKSPACES[dtype] = (abufs, bbufs)
    _clear_plans()  # plans hold the old buffers
    return abufs, bbufs


_SERIAL_WORKSPACES: dict = {}


def _serial_workspace(dtype, a_elems, b_elems, n_rows):
    """The serial driver's scratch (A block, B panel, row offsets), kept and grown like _workspace."""
    ws = _SERIAL_WORKSPACES.get(dtype)
    if ws is None or ws[0].size < a_elems or ws[1].size < b_elems or ws[2].size < n_rows:
        old = ws or (np.empty(0, dtype), np.empty(0, dtype), np.empty(0, np.int64))
        ws = (old[0] if old[0].size >= a_elems else np.empty(a_elems, dtype),
              old[1] if old[1].size >= b_elems else np.empty(b_elems, dtype),
              old[2] if old[2].size >= n_rows else np.empty(n_rows, np.int64))
        _SERIAL_WORKSPACES[dtype] = ws
        _clear_plans()
    return ws


def _mr(dtype):
    return MR_F32 if dtype == np.float32 else MR_F64


def _cdiv_py(a, b):
    return -(-a // b)


# alpha = 1 and beta = 0 or 1, as the dtype's scalars (the kernels' signature): made once,
# not per call (each costs 0.3 us)
_UNIT_SCALARS = {np.dtype(t): (t(1), t(0)) for t in (np.float32, np.float64)}


def _kernel_scalars(dtype, alpha, beta):
    one, zero = _UNIT_SCALARS[dtype]
    return (one if alpha == 1 else dtype.type(alpha),
            zero if beta == 0 else one if beta == 1 else dtype.type(beta))


def _plan(m, n, k, brs, bcs, dtype, nthreads):
    """(serial, scratch 1, scratch 2, scratch 3) of a product: the serial driver's (A block,
    B panel, row offsets), or the parallel one's per-thread (A, B) buffers and None."""
    mr = _mr(dtype)
    direct = _direct_shape.py_func(m, n, k, mr, dtype.itemsize, brs, bcs)
    if m * n * k <= SERIAL_WORK:
        kb = KC * 4 // dtype.itemsize  # _k_block's
        na, nb, nrows = _serial_scratch.py_func(m, n, k, mr, kb, direct)
        return (True,) + _serial_workspace(dtype, na, nb, nrows)
    if direct:
        a_elems, b_elems = 0, k * _cdiv_py(n, NR) * NR
    else:
        kc = min(k, KC)
        a_elems, b_elems = _cdiv_py(min(m, MC), mr) * mr * kc, _cdiv_py(min(n, NC), NR) * NR * kc
    return (False,) + _workspace(dtype, a_elems, b_elems) + (None,)


def gemm_into(a, b, out, alpha=1.0, beta=0.0):
    """``out = alpha * a @ b + beta * out`` with no validation (see module docstring)."""
    m, k = a.shape
    n = b.shape[1]
    nthreads = get_num_threads()
    dtype = out.dtype
    contiguous = a.flags.c_contiguous and b.flags.c_contiguous
    # the common call, planned with its scalars: 0.5 us less Python than the full lookup
    plan = _CONTIGUOUS_PLANS.get((m, n, k, dtype, nthreads, alpha, beta)) if contiguous else None
    if plan is not None:
        serial, w1, w2, w3, alpha, beta = plan
        fa, aoff, ars, acs = a.ravel(), 0, k, 1
        fb, boff, brs, bcs = b.ravel(), 0, n, 1
    else:
        if m == 0 or n == 0:
            return out
        scalars = _kernel_scalars(dtype, alpha, beta)
        if k == 0:
            if scalars[1] == 0:
                out.fill(0)
            else:
                out *= scalars[1]
            return out
        fa, aoff, ars, acs = _flat_np(a)
        fb, boff, brs, bcs = _flat_np(b)
        key = (m, n, k, brs, bcs, dtype, nthreads)
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= _MAX_PLANS:
                _clear_plans()
            plan = _PLANS[key] = _plan(m, n, k, brs, bcs, dtype, nthreads)
        if contiguous:
            if len(_CONTIGUOUS_PLANS) >= _MAX_PLANS:  # (many alphas, say)
                _CONTIGUOUS_PLANS.clear()
            _CONTIGUOUS_PLANS[(m, n, k, dtype, nthreads, alpha, beta)] = plan + scalars
        serial, w1, w2, w3 = plan
        alpha, beta = scalars
    if serial:
        _gemm_flat_serial(m, n, k, fa, aoff, ars, acs, fb, boff, brs, bcs, out.ravel(), 0, n, 1, alpha, beta,
                          w1, w2, w3)
    else:
        _gemm_flat_parallel(m, n, k, fa, aoff, ars, acs, fb, boff, brs, bcs, out.ravel(), alpha, beta, w1, w2,
                            nthreads)
    return out


def _check_matmul_args(a, b, trans_a, trans_b):
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if a.dtype != b.dtype or a.dtype not in _MATMUL_DTYPES:
        raise TypeError(
            f"matmul needs two float32 or two float64 arrays, got a: {a.dtype}, b: {b.dtype}"
        )
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul needs 2-D arrays, got a.shape={a.shape}, b.shape={b.shape}")
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    if opa.shape[1] != opb.shape[0]:
        raise ValueError(
            f"matmul shape mismatch: a.shape={a.shape} (trans_a={trans_a}) and "
            f"b.shape={b.shape} (trans_b={trans_b}) give op(a) {opa.shape} @ op(b) {opb.shape}"
        )
    return opa, opb


def _plain_product(a, b, trans_a, trans_b, alpha, beta, out):
    """Whether a call is the common valid one that the full checks would pass unchanged:
    untransposed float arrays of one dtype, float scalars, a matching C-contiguous
    ``out`` (or None) that owns its memory (so it cannot overlap inputs owning theirs),
    and no empty dimension. The full checks cost 2.5 us, a sixth of a 64x120x84 product."""
    if type(a) is not np.ndarray or type(b) is not np.ndarray or type(alpha) is not float or type(beta) is not float \
            or trans_a is not False or trans_b is not False:
        return False
    dt = a.dtype
    sa, sb = a.shape, b.shape
    if (dt is not _F32 and dt is not _F64) or b.dtype is not dt or len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0] \
            or not (sa[0] and sa[1] and sb[1]) or not (alpha == 1.0 or math.isfinite(alpha)) \
            or not (beta == 0.0 or math.isfinite(beta)):
        return False
    if out is None:
        return True
    # an array owns its memory exactly when its base is None (cheaper than its flags)
    if type(out) is not np.ndarray or out.dtype is not dt or out.shape != (sa[0], sb[1]) or out is a or out is b \
            or a.base is not None or b.base is not None or out.base is not None:
        return False
    fo = out.flags
    return fo.c_contiguous and fo.writeable


def matmul(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None):
    """``alpha * op(a) @ op(b) + beta * out`` for 2-D float32/float64 arrays.

    ``op(x)`` is ``x.T`` when the matching ``trans_*`` flag is set. With
    ``out=None`` a new array is returned and ``beta`` is ignored. Otherwise
    ``out`` must be a C-contiguous array of shape (M, N) and the inputs' dtype,
    not overlapping either input; it is updated in place and returned.
    Any strides are accepted for ``a`` and ``b`` (they are packed internally).
    Uses :func:`fastkern.get_num_threads` threads.

    Raises TypeError for non-float or mixed dtypes and ValueError for
    mismatched shapes, naming the shapes and transposes.
    """
    if _plain_product(a, b, trans_a, trans_b, alpha, beta, out):
        if out is None:
            return gemm_into(a, b, np.empty((a.shape[0], b.shape[1]), a.dtype), alpha, 0.0)
        return gemm_into(a, b, out, alpha, beta)
    opa, opb = _check_matmul_args(a, b, trans_a, trans_b)
    alpha = check_scalar(alpha, "alpha")
    beta = check_scalar(beta, "beta")
    m, n = opa.shape[0], opb.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)
        beta = 0.0
    else:
        check_out(out, (m, n), a.dtype)
        check_no_overlap(out, a=a, b=b)
    if m == 0 or n == 0:
        return out
    return gemm_into(opa, opb, out, alpha, beta)


def _warmup(dtype):
    """Compile (or load from cache) the kernels matmul uses for ``dtype``: the parallel driver
    (one for every shape) and the serial one of small products."""
    dtype = np.dtype(dtype).type
    x = np.ones((64, KC + 1), dtype)
    gemm_into(x, x.T, np.empty((64, 64), dtype))  # parallel
    gemm_into(x[:8, :4], x[:8, :4].T, np.empty((8, 8), dtype))  # serial

"""im2col / col2im: the gather and scatter-add behind the convolutions.

Layout (the same as ``torch.nn.functional.unfold``/``fold``, extended to 1-D and
3-D): for an input of shape ``(N, C, *S)`` and a kernel of shape ``k``, the
columns have shape ``(N, C * prod(k), prod(O))`` where ``O`` is the output
spatial size. Row ``((c * kD + kd) * kH + kh) * kW + kw`` of a sample holds
input channel ``c`` seen through kernel tap ``(kd, kh, kw)``; column
``(od * OH + oh) * OW + ow`` is output position ``(od, oh, ow)``. Taps that fall
into the zero padding read 0. ``col2im`` is the adjoint of ``im2col``: it
sum-scatters every column entry back onto the input pixel it was read from.

Kernels work on 3-D geometry; 1-D and 2-D inputs are views with leading
spatial dims of size 1. Geometry travels as one int tuple
``geo = (KD, KH, KW, sD, sH, sW, pD, pH, pW, dD, dH, dW, OD, OH, OW)`` where
``p*`` is the padding before each dim (padding after is implied by ``O*``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import as_tuple, check_array, check_non_negative, check_positive


@njit(inline="always")
def _valid_range(off, s, n_in, n_out):
    """The output indices ``o`` in [0, n_out) whose tap ``o * s + off`` lies in [0, n_in)."""
    lo = 0
    if off < 0:
        lo = (-off + s - 1) // s
    hi = 0
    if off < n_in:
        hi = (n_in - 1 - off) // s + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi


@njit(cache=True, _nrt=False)
def gather_rows(x, col, c0, c1, r0, r1, geo):
    """im2col of channels [c0, c1) and output rows [r0, r1) of one sample.

    ``x`` is (C, D, H, W); ``col`` has a row per (channel, tap), indexed with
    the absolute channel, and ``(r1 - r0) * OW`` columns, where an output
    "row" ``r = od * OH + oh`` is one line of OW outputs.
    """
    KD, KH, KW, sd, sh, sw, pd, ph, pw, dd, dh, dw, OD, OH, OW = geo
    D, H, W = x.shape[1], x.shape[2], x.shape[3]
    zero = col.dtype.type(0)
    for c in range(c0, c1):
        for kd in range(KD):
            for kh in range(KH):
                for kw in range(KW):
                    row = ((c * KD + kd) * KH + kh) * KW + kw
                    off = kw * dw - pw
                    lo, hi = _valid_range(off, sw, W, OW)
                    for r in range(r0, r1):
                        od = r // OH
                        oh = r - od * OH
                        iz = od * sd - pd + kd * dd
                        iy = oh * sh - ph + kh * dh
                        # Slices make every index provably >= 0 (no negative-index fix-up),
                        # so the copies vectorize.
                        dst = col[row, (r - r0) * OW : (r - r0 + 1) * OW]
                        if iz < 0 or iz >= D or iy < 0 or iy >= H:
                            for ow in range(OW):
                                dst[ow] = zero
                            continue
                        for ow in range(lo):
                            dst[ow] = zero
                        if sw == 1:
                            src = x[c, iz, iy, lo + off : hi + off]
                            run = dst[lo:hi]
                            for e in range(hi - lo):
                                run[e] = src[e]
                        else:
                            src = x[c, iz, iy]
                            for ow in range(lo, hi):
                                dst[ow] = src[ow * sw + off]
                        for ow in range(hi, OW):
                            dst[ow] = zero


@njit(cache=True, _nrt=False)
def scatter_rows(dx, col, c0, c1, r0, r1, geo):
    """col2im of channels [c0, c1) and output rows [r0, r1): ``dx += fold(col)``.

    The adjoint of :func:`gather_rows`. The caller owns ``dx`` channels
    [c0, c1) exclusively, so there are no concurrent writers.
    """
    KD, KH, KW, sd, sh, sw, pd, ph, pw, dd, dh, dw, OD, OH, OW = geo
    D, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    for c in range(c0, c1):
        for kd in range(KD):
            for kh in range(KH):
                for kw in range(KW):
                    row = ((c * KD + kd) * KH + kh) * KW + kw
                    off = kw * dw - pw
                    lo, hi = _valid_range(off, sw, W, OW)
                    for r in range(r0, r1):
                        od = r // OH
                        oh = r - od * OH
                        iz = od * sd - pd + kd * dd
                        iy = oh * sh - ph + kh * dh
                        if iz < 0 or iz >= D or iy < 0 or iy >= H:
                            continue
                        src = col[row, (r - r0) * OW + lo : (r - r0) * OW + hi]
                        if sw == 1:
                            run = dx[c, iz, iy, lo + off : hi + off]
                            for e in range(hi - lo):
                                run[e] += src[e]
                        else:
                            drow = dx[c, iz, iy]
                            for e in range(hi - lo):
                                drow[(lo + e) * sw + off] += src[e]


@njit(parallel=True, cache=True)
def _im2col_kernel(x, cols, geo):
    # One (sample, channel) per work item: each writes its own block of rows.
    n_items = x.shape[0] * x.shape[1]
    rows = geo[12] * geo[13]
    for i in prange(n_items):
        n = i // x.shape[1]
        c = i - n * x.shape[1]
        gather_rows(x[n], cols[n], c, c + 1, 0, rows, geo)


@njit(parallel=True, cache=True)
def _col2im_kernel(cols, dx, geo):
    # One (sample, channel) per work item: each owns its slice of dx (no races).
    n_items = dx.shape[0] * dx.shape[1]
    rows = geo[12] * geo[13]
    for i in prange(n_items):
        n = i // dx.shape[1]
        c = i - n * dx.shape[1]
        dx[n, c] = 0
        scatter_rows(dx[n], cols[n], c, c + 1, 0, rows, geo)


# ---------------------------------------------------------------------------
# Geometry shared with conv.py


def out_size(size, k, stride, pad_lo, pad_hi, dilation):
    """Output length of one spatial dim (may be <= 0 when the kernel does not fit)."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def lift3(values, fill):
    """Pad a 1- or 2-tuple on the left to 3 entries (1-D/2-D ops run as 3-D)."""
    return (fill,) * (3 - len(values)) + tuple(values)


def make_geo(kernel, stride, pad_lo, dilation, out):
    """The int64 geometry tuple the kernels take (all arguments already 3-tuples)."""
    return tuple(int(v) for v in (*kernel, *stride, *pad_lo, *dilation, *out))


def spatial_params(nd, kernel, stride, padding, dilation, spatial, *, allow_same=False):
    """Validate stride/padding/dilation for ``nd`` spatial dims.

    Returns ``(stride, pad_lo, pad_hi, dilation, out)`` as ``nd``-tuples.
    ``padding`` is an int, an ``nd``-tuple, or (with ``allow_same``) 'valid'
    or 'same' as in torch: 'same' needs stride 1 and, when the total padding
    ``dilation * (k - 1)`` is odd, puts the extra element after the input.
    """
    stride = check_positive(as_tuple(stride, nd, "stride"), "stride")
    dilation = check_positive(as_tuple(dilation, nd, "dilation"), "dilation")
    if isinstance(padding, str):
        if not allow_same or padding not in ("valid", "same"):
            want = "'valid', 'same', " if allow_same else ""
            raise ValueError(f"padding must be {want}an int or a tuple of {nd} ints, got {padding!r}")
        if padding == "valid":
            pad_lo = pad_hi = (0,) * nd
        else:
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride={stride}")
            total = tuple(d * (k - 1) for d, k in zip(dilation, kernel))
            pad_lo = tuple(t // 2 for t in total)
            pad_hi = tuple(t - t // 2 for t in total)
    else:
        pad_lo = pad_hi = check_non_negative(as_tuple(padding, nd, "padding"), "padding")
    out = tuple(
        out_size(s, k, st, lo, hi, d)
        for s, k, st, lo, hi, d in zip(spatial, kernel, stride, pad_lo, pad_hi, dilation)
    )
    if any(o <= 0 for o in out):
        eff = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
        padded = tuple(s + lo + hi for s, lo, hi in zip(spatial, pad_lo, pad_hi))
        raise ValueError(
            f"kernel size {tuple(kernel)} (dilated: {eff}) is larger than the padded input "
            f"{padded} (input {tuple(spatial)}, padding {pad_lo}+{pad_hi})"
        )
    return stride, pad_lo, pad_hi, dilation, out


def _kernel_size(kernel_size, nd):
    k = check_positive(as_tuple(kernel_size, nd, "kernel_size"), "kernel_size")
    return k


# ---------------------------------------------------------------------------
# Public API


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """Unfold sliding blocks of ``x`` (N, C, *S) with 1 to 3 spatial dims into columns.

    Returns a new C-contiguous array of shape ``(N, C * prod(kernel_size), L)``
    with ``L = prod(output spatial size)``. Row ``((c*kD + kd)*kH + kh)*kW + kw``
    of sample ``n`` holds channel ``c`` at kernel tap ``(kd, kh, kw)`` (fewer
    taps for 1-D/2-D); column ``(od*OH + oh)*OW + ow`` is output position
    ``(od, oh, ow)``; padded taps are 0. For 2-D this equals
    ``torch.nn.functional.unfold``. ``stride``, ``padding`` (>= 0) and
    ``dilation`` are ints or tuples, one entry per spatial dim.
    """
    check_array(x, "x", (3, 4, 5))
    nd = x.ndim - 2
    k = _kernel_size(kernel_size, nd)
    stride, pad_lo, _, dilation, out = spatial_params(nd, k, stride, padding, dilation, x.shape[2:])
    n, c = x.shape[:2]
    cols = np.empty((n, c * int(np.prod(k)), int(np.prod(out))), dtype=x.dtype)
    if cols.size == 0:
        return cols
    x5 = np.ascontiguousarray(x).reshape((n, c) + lift3(x.shape[2:], 1))
    geo = make_geo(lift3(k, 1), lift3(stride, 1), lift3(pad_lo, 0), lift3(dilation, 1), lift3(out, 1))
    _im2col_kernel(x5, cols, geo)
    return cols


def col2im(cols, output_size, kernel_size, stride=1, padding=0, dilation=1):
    """Fold columns back into an image, summing overlapping entries (adjoint of :func:`im2col`).

    ``cols`` has the :func:`im2col` layout ``(N, C * prod(kernel_size), L)``;
    ``output_size`` is the image's spatial size (1 to 3 ints), from which the
    number of blocks ``L`` must follow. Returns a new ``(N, C, *output_size)``
    array. For 2-D this equals ``torch.nn.functional.fold``.
    """
    check_array(cols, "cols", 3)
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        output_size = (output_size,)
    if not isinstance(output_size, (tuple, list)) or not 1 <= len(output_size) <= 3:
        raise ValueError(f"output_size must be 1 to 3 ints, got {output_size!r}")
    nd = len(output_size)
    size = check_positive(as_tuple(tuple(output_size), nd, "output_size"), "output_size")
    k = _kernel_size(kernel_size, nd)
    stride, pad_lo, _, dilation, out = spatial_params(nd, k, stride, padding, dilation, size)
    kvol, n_blocks = int(np.prod(k)), int(np.prod(out))
    n, rows, length = cols.shape
    if rows % kvol or length != n_blocks:
        raise ValueError(
            f"cols of shape {cols.shape} do not match kernel_size {k} and output_size {size}: "
            f"need dim 1 divisible by {kvol} and dim 2 == {n_blocks} blocks"
        )
    c = rows // kvol
    dx = np.empty((n, c) + size, dtype=cols.dtype)
    if dx.size == 0:
        return dx
    geo = make_geo(lift3(k, 1), lift3(stride, 1), lift3(pad_lo, 0), lift3(dilation, 1), lift3(out, 1))
    _col2im_kernel(np.ascontiguousarray(cols), dx.reshape((n, c) + lift3(size, 1)), geo)
    return dx

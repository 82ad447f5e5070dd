import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern as fk
from fastkern.testing import gradcheck

SETTINGS = settings(max_examples=30, deadline=None)


# ---- naive references: explicit window loops over a padded copy


def ref_max_pool2d(x, k, s, p, d):
    n, c, h, w = x.shape
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    idx = np.empty((n, c, oh, ow), np.int64)
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    best, arg = -np.inf, None
                    for u in range(k[0]):
                        for v in range(k[1]):
                            r, q = i * s[0] - p[0] + u * d[0], j * s[1] - p[1] + v * d[1]
                            if 0 <= r < h and 0 <= q < w and (arg is None or x[a, b, r, q] > best):
                                best, arg = x[a, b, r, q], r * w + q
                    y[a, b, i, j], idx[a, b, i, j] = best, arg
    return y, idx


def ref_avg_pool2d(x, k, s, p, include_pad):
    n, c, h, w = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    ones = np.pad(np.ones((h, w)), ((p[0], p[0]), (p[1], p[1])))
    oh, ow = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
    y = np.empty((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = (slice(i * s[0], i * s[0] + k[0]), slice(j * s[1], j * s[1] + k[1]))
            count = ones[win].size if include_pad else ones[win].sum()
            y[:, :, i, j] = xp[(Ellipsis,) + win].sum(axis=(2, 3)) / count
    return y.astype(x.dtype)


@st.composite
def geometries(draw, dilate=True):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilate else (1, 1)
    h = draw(st.integers(max(1, d[0] * (k[0] - 1) + 1 - 2 * p[0]), 7))
    w = draw(st.integers(max(1, d[1] * (k[1] - 1) + 1 - 2 * p[1]), 7))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w)
    return shape, k, s, p, d


def _x(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _covers_input(shape, k, s, p, d):
    for size, ki, si, pi, di in zip(shape[2:], k, s, p, d):
        o = (size + 2 * pi - di * (ki - 1) - 1) // si + 1
        if any(not any(0 <= j * si - pi + t * di < size for t in range(ki)) for j in range(o)):
            return False
    return True


# ---- max pool


@SETTINGS
@given(geom=geometries(), dtype=st.sampled_from([np.float32, np.float64]))
def test_max_pool2d_matches_reference_and_gradcheck(geom, dtype):
    shape, k, s, p, d = geom
    if not _covers_input(shape, k, s, p, d):
        with pytest.raises(ValueError, match="only padding"):
            fk.max_pool2d(_x(shape), k, s, p, d)
        return
    x = _x(shape, 1, dtype)
    y, idx = fk.max_pool2d(x, k, s, p, d, return_indices=True)
    ry, ridx = ref_max_pool2d(x, k, s, p, d)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(fk.max_pool2d(x, k, s, p, d), ry)
    if dtype == np.float64:
        gradcheck(lambda x: fk.max_pool2d(x, k, s, p, d), [x],
                  lambda g, x: (fk.max_pool2d_backward(g, fk.max_pool2d(x, k, s, p, d, return_indices=True)[1],
                                                       x.shape, k, s, p, d),))


@SETTINGS
@given(geom=geometries())
def test_max_pool1d_is_max_pool2d_on_one_row(geom):
    (n, c, _, w), (_, k), (_, s), (_, p), (_, d) = geom
    x = _x((n, c, w), 2)
    if not _covers_input((n, c, 1, w), (1, k), (1, s), (0, p), (1, d)):
        return
    y, idx = fk.max_pool1d(x, k, s, p, d, return_indices=True)
    ry, ridx = ref_max_pool2d(x[:, :, None], (1, k), (1, s), (0, p), (1, d))
    np.testing.assert_array_equal(y, ry[:, :, 0])
    np.testing.assert_array_equal(idx, ridx[:, :, 0])
    g = _x(y.shape, 3)
    gx = fk.max_pool1d_backward(g, idx, x.shape, k, s, p, d)
    want = np.zeros_like(x)
    for a, b, j in np.ndindex(*y.shape):
        want[a, b, idx[a, b, j]] += g[a, b, j]
    np.testing.assert_allclose(gx, want, rtol=1e-14)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_ties_send_the_gradient_to_the_first_maximum(k, s, p):
    x = np.ones((1, 2, 6, 6))
    y, idx = fk.max_pool2d(x, k, s, p, return_indices=True)
    gx = fk.max_pool2d_backward(np.ones_like(y), idx, x.shape, k, s, p)
    want = np.zeros_like(x)
    for i, j in np.ndindex(*y.shape[2:]):
        want[:, :, max(0, i * s - p), max(0, j * s - p)] += 1  # first in-bounds element of the window
    np.testing.assert_array_equal(gx, want)


def test_overlapping_windows_accumulate_and_padding_never_wins():
    x = -np.arange(1.0, 26.0).reshape(1, 1, 5, 5)  # all negative: padded zeros must not win
    x[0, 0, 2, 2] = 10.0
    y, idx = fk.max_pool2d(x, 3, 1, 1, return_indices=True)
    assert np.all(y < 11) and y[0, 0, 2, 2] == 10.0
    assert (idx == 12).sum() == 9  # the peak wins all nine windows that see it
    gx = fk.max_pool2d_backward(np.ones_like(y), idx, x.shape, 3, 1, 1)
    assert gx[0, 0, 2, 2] == 9.0 and gx.sum() == y.size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 32, 32, 32), (3, 5, 31, 17), (2, 2, 3, 3), (4, 8, 2, 9), (2, 3, 6, 34),
                                   (1, 2, 5, 67)])
def test_2x2_fast_path_including_odd_sizes_and_parallel(shape, dtype):
    x = _x(shape, 4, dtype)
    y, idx = fk.max_pool2d(x, 2, return_indices=True)
    if shape[0] <= 3:
        ry, ridx = ref_max_pool2d(x, (2, 2), (2, 2), (0, 0), (1, 1))
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(idx, ridx)
    g = _x(y.shape, 5, dtype)
    gx = fk.max_pool2d_backward(g, idx, shape, 2)
    n, c, h, w = shape
    want = np.zeros((n * c, h * w), dtype)
    np.put_along_axis(want, idx.reshape(n * c, -1), g.reshape(n * c, -1), axis=1)
    np.testing.assert_array_equal(gx, want.reshape(shape))


def ref_torch_scan_2x2(x):
    """torch's CPU max pool scan over a 2x2 window: strict >, and a NaN always takes over."""
    n, c, h, w = x.shape
    y = np.empty((n, c, h // 2, w // 2), x.dtype)
    idx = np.empty(y.shape, np.int64)
    for a, b, i, j in np.ndindex(*y.shape):
        best, arg = x[a, b, 2 * i, 2 * j], 2 * i * w + 2 * j
        for r, q in ((2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)):
            v = x[a, b, r, q]
            if v > best or np.isnan(v):
                best, arg = v, r * w + q
        y[a, b, i, j], idx[a, b, i, j] = best, arg
    return y, idx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_2x2_fast_path_ties_nans_and_infinities_follow_torchs_scan(dtype):
    rng = np.random.default_rng(7)
    x = rng.integers(-2, 3, (2, 3, 8, 70)).astype(dtype)  # many ties, rows of 35 windows
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.05] = np.inf
    x[rng.random(x.shape) < 0.05] = -np.inf
    x[rng.random(x.shape) < 0.05] = -0.0
    y, idx = fk.max_pool2d(x, 2, return_indices=True)
    ry, ridx = ref_torch_scan_2x2(x)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(y, ry)
    assert np.array_equal(np.signbit(y), np.signbit(ry))


def test_nan_wins_the_window():
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 1, 0] = np.nan
    y, idx = fk.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 4 and y[0, 0, 0, 1] == 0
    y2, idx2 = fk.max_pool2d(x, 2, 1, return_indices=True)
    assert np.isnan(y2[0, 0, 0, 0]) and idx2[0, 0, 0, 0] == 4


def test_unbatched_input():
    x = _x((3, 6, 6), 6)
    y, idx = fk.max_pool2d(x, 3, 2, 1, return_indices=True)
    yb, idxb = fk.max_pool2d(x[None], 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(y, yb[0])
    g = _x(y.shape, 7)
    np.testing.assert_array_equal(fk.max_pool2d_backward(g, idx, x.shape, 3, 2, 1),
                                  fk.max_pool2d_backward(g[None], idxb, (1,) + x.shape, 3, 2, 1)[0])
    np.testing.assert_array_equal(fk.avg_pool1d(x[0], 3, 1, 1), fk.avg_pool1d(x[:1], 3, 1, 1)[0])


# ---- average pools


@SETTINGS
@given(geom=geometries(dilate=False), include_pad=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_avg_pool2d_matches_reference_and_gradcheck(geom, include_pad, dtype):
    shape, k, s, p, _ = geom
    x = _x(shape, 8, dtype)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(fk.avg_pool2d(x, k, s, p, include_pad), ref_avg_pool2d(x, k, s, p, include_pad),
                               rtol=rtol, atol=rtol)
    if dtype == np.float64:
        gradcheck(lambda x: fk.avg_pool2d(x, k, s, p, include_pad), [x],
                  lambda g, x: (fk.avg_pool2d_backward(g, x.shape, k, s, p, include_pad),))
        gradcheck(lambda x: fk.avg_pool1d(x[:, :, 0], k[1], s[1], p[1], include_pad), [x[:, :, :1]],
                  lambda g, x: (fk.avg_pool1d_backward(g, x[:, :, 0].shape, k[1], s[1], p[1],
                                                       include_pad)[:, :, None],))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (16, 16, 24, 24)])
def test_global_avg_pool2d(shape):
    x = _x(shape, 9)
    np.testing.assert_allclose(fk.global_avg_pool2d(x), x.mean(axis=(2, 3)), rtol=1e-12, atol=1e-15)
    gradcheck(fk.global_avg_pool2d, [x[:2, :2, :3, :3]],
              lambda g, x: (fk.global_avg_pool2d_backward(g, x.shape),))
    g = _x(shape[:2], 10)
    np.testing.assert_allclose(fk.global_avg_pool2d_backward(g, shape),
                               np.broadcast_to(g[:, :, None, None] / (shape[2] * shape[3]), shape), rtol=1e-14)


@pytest.mark.parametrize("shape", [(8, 16, 32, 32)])
def test_parallel_avg_paths(shape):
    x = _x(shape, 11, np.float32)
    np.testing.assert_allclose(fk.avg_pool2d(x, 3, 2, 1), ref_avg_pool2d(x, (3, 3), (2, 2), (1, 1), True), rtol=1e-5,
                               atol=1e-6)
    g = _x((8, 16, 16, 16), 12, np.float32)
    gx = fk.avg_pool2d_backward(g, shape, 3, 2, 1)
    # The adjoint identity <avg(x), g> == <x, avg_backward(g)> pins down the scatter.
    lhs = np.vdot(fk.avg_pool2d(x, 3, 2, 1).astype(np.float64), g)
    np.testing.assert_allclose(lhs, np.vdot(x.astype(np.float64), gx), rtol=1e-4)


# ---- torch as an independent oracle


@pytest.mark.parametrize("k,s,p,d", [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2), ((2, 3), (1, 2), (1, 1), 1)])
def test_max_pool2d_against_torch(k, s, p, d):
    torch = pytest.importorskip("torch")
    x = _x((2, 3, 9, 10), 13)
    x[0, 0, :4, :4] = 0.5  # ties
    tx = torch.tensor(x, requires_grad=True)
    ty, ti = torch.nn.functional.max_pool2d(tx, k, s, p, d, return_indices=True)
    g = _x(tuple(ty.shape), 14)
    ty.backward(torch.tensor(g))
    y, idx = fk.max_pool2d(x, k, s, p, d, return_indices=True)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(idx, ti.numpy())
    np.testing.assert_allclose(fk.max_pool2d_backward(g, idx, x.shape, k, s, p, d), tx.grad.numpy(), rtol=1e-14)


@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), ((3, 2), (2, 1), (1, 1))])
def test_avg_pool2d_against_torch(k, s, p, include_pad):
    torch = pytest.importorskip("torch")
    x = _x((2, 3, 9, 10), 15)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, k, s, p, count_include_pad=include_pad)
    g = _x(tuple(ty.shape), 16)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(fk.avg_pool2d(x, k, s, p, include_pad), ty.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(fk.avg_pool2d_backward(g, x.shape, k, s, p, include_pad), tx.grad.numpy(),
                               rtol=1e-13)


# ---- bad input


def test_bad_inputs_raise():
    x = np.zeros((1, 2, 5, 5))
    with pytest.raises(ValueError, match="larger than the padded input"):
        fk.max_pool2d(x, 6)
    with pytest.raises(ValueError, match="larger than the padded input"):
        fk.avg_pool1d(np.zeros((1, 1, 3)), 4, padding=0)
    with pytest.raises(ValueError, match=r"padding must be at most half of kernel_size.*\(2, 2\).*\(3, 3\)"):
        fk.max_pool2d(x, 3, padding=2)
    with pytest.raises(ValueError, match=r"stride must be > 0"):
        fk.avg_pool2d(x, 2, stride=0)
    with pytest.raises(ValueError, match=r"kernel_size must be > 0"):
        fk.max_pool1d(x[0], 0)
    with pytest.raises(ValueError, match=r"dilation must be > 0"):
        fk.max_pool2d(x, 2, dilation=(1, 0))
    with pytest.raises(ValueError, match=r"padding must be >= 0"):
        fk.max_pool2d(x, 2, padding=-1)
    with pytest.raises(TypeError, match="kernel_size"):
        fk.max_pool2d(x, 2.5)
    with pytest.raises(ValueError, match=r"3 or 4-D"):
        fk.max_pool2d(x[0, 0], 2)
    with pytest.raises(ValueError, match=r"2 or 3-D"):
        fk.avg_pool1d(x, 2)
    with pytest.raises(ValueError, match="4-D"):
        fk.global_avg_pool2d(x[0])
    with pytest.raises(TypeError, match="float32 or float64"):
        fk.max_pool2d(x.astype(np.int32), 2)
    y, idx = fk.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(ValueError, match=r"grad_y has shape \(1, 2, 3, 3\), expected \(1, 2, 2, 2\)"):
        fk.max_pool2d_backward(np.zeros((1, 2, 3, 3)), idx, x.shape, 2)
    with pytest.raises(ValueError, match="indices has shape"):
        fk.max_pool2d_backward(y, idx[:, :1], x.shape, 2)
    with pytest.raises(TypeError, match="int64"):
        fk.max_pool2d_backward(y, idx.astype(np.int32), x.shape, 2)
    for bad in (-1, 25, 7):  # 7 is inside the plane but outside window (0, 0)
        wrong = idx.copy()
        wrong[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="outside their pooling window"):
            fk.max_pool2d_backward(y, wrong, x.shape, 2)
    wrong = fk.max_pool2d(x, 3, 1, 1, return_indices=True)[1]
    wrong[0, 1, 2, 2] = 25
    with pytest.raises(ValueError, match="outside"):
        fk.max_pool2d_backward(np.zeros(wrong.shape), wrong, x.shape, 3, 1, 1)
    with pytest.raises(TypeError, match="input_shape"):
        fk.avg_pool2d_backward(y, "shape", 2)
    with pytest.raises(ValueError, match="input_shape must have 3 or 4 dims"):
        fk.avg_pool2d_backward(y, (5, 5), 2)
    with pytest.raises(ValueError, match=r"grad_y has shape"):
        fk.global_avg_pool2d_backward(np.zeros((2, 1)), x.shape)
    with pytest.raises(ValueError, match="only padding"):
        fk.max_pool1d(np.zeros((1, 1, 4)), 2, 1, 1, 5)


def test_checked_geometry_is_reused_only_for_identical_arguments():
    # The second call of each pair hits the geometry cache's key space: True == 1 and
    # 2.0 == 2 must still be rejected, and a bad call must not poison later good ones.
    x = np.zeros((1, 2, 6, 6), np.float32)
    fk.max_pool2d(x, 2, stride=1)
    with pytest.raises(TypeError, match="stride"):
        fk.max_pool2d(x, 2, stride=True)
    fk.max_pool2d(x, 2)
    with pytest.raises(TypeError, match="kernel_size"):
        fk.max_pool2d(x, 2.0)
    with pytest.raises(ValueError, match="larger than the padded input"):
        fk.max_pool2d(x, 7)
    with pytest.raises(ValueError, match="larger than the padded input"):
        fk.max_pool2d(x, 7)
    assert fk.max_pool2d(x, 2).shape == (1, 2, 3, 3)

"""3x3 stride-1 conv2d by Winograd F(4x4, 3x3): against the naive reference, finite differences and torch."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern
from fastkern import conv as conv_mod
from fastkern import winograd
from fastkern.testing import gradcheck
from fastkern.threads import max_threads

from .test_conv import SETTINGS, naive_conv, naive_conv_grad_w


@pytest.fixture
def forced(monkeypatch):
    """Winograd wherever the shape allows (small channel counts included)."""
    monkeypatch.setattr(conv_mod, "_WINOGRAD", True)


def _arrays(n, c, h, w, co, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((co, c, 3, 3)).astype(dtype),
            rng.standard_normal(co).astype(dtype))


def _tol(dtype, scale=1.0):
    return dict(rtol=1e-4, atol=1e-4 * scale) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10 * scale)


@st.composite
def cases(draw):
    # channels across one and two NR-wide panels, odd and rectangular maps (a last tile half
    # outside the output), padding 0-2, batches smaller and larger than a chunk
    padding = draw(st.integers(0, 2))
    lo = max(1, 3 - 2 * padding)
    return dict(n=draw(st.integers(1, 5)), c=draw(st.sampled_from([1, 3, 16, 33])),
                h=draw(st.integers(lo, 11)), w=draw(st.integers(lo, 11)), co=draw(st.sampled_from([1, 5, 32, 40])),
                padding=padding, dtype=draw(st.sampled_from([np.float32, np.float64])), seed=draw(st.integers(0, 99)))


@settings(max_examples=30, **SETTINGS)
@given(cases())
def test_forward_and_gradients_match_the_naive_reference(case):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_mod, "_WINOGRAD", True)
        x, w, b = _arrays(case["n"], case["c"], case["h"], case["w"], case["co"], case["dtype"], case["seed"])
        p = case["padding"]
        want = naive_conv(x, w, b, 1, p, 1, 1)
        scale = np.sqrt(9 * case["c"])
        np.testing.assert_allclose(fastkern.conv2d(x, w, b, padding=p), want, **_tol(case["dtype"], scale))
        gy = np.random.default_rng(case["seed"] + 1).standard_normal(want.shape).astype(case["dtype"])
        dx, dw, db = fastkern.conv2d_backward(gy, x, w, padding=p)
        # grad input is the transposed convolution: the conv of grad_y with the flipped kernels
        want_dx = naive_conv(gy, np.flip(w, (2, 3)).transpose(1, 0, 2, 3).copy(), None, 1, 2 - p, 1, 1)
        np.testing.assert_allclose(dx, want_dx, **_tol(case["dtype"], np.sqrt(9 * case["co"])))
        np.testing.assert_allclose(dw, naive_conv_grad_w(gy, x, w, 1, p),
                                   **_tol(case["dtype"], np.sqrt(gy[0, 0].size * case["n"])))
        np.testing.assert_allclose(db, gy.sum(axis=(0, 2, 3)), **_tol(case["dtype"], np.sqrt(gy[0, 0].size)))


@pytest.mark.parametrize("size,padding", [((5, 4), 1), ((6, 7), 0), ((3, 3), 2)])
def test_backward_matches_finite_differences(size, padding, forced):
    x, w, b = _arrays(2, 3, *size, 4, np.float64, 5)

    def f(x, w, b):
        return fastkern.conv2d(x, w, b, padding=padding)

    def backward(gy, x, w, b):
        return fastkern.conv2d_backward(gy, x, w, padding=padding)

    assert gradcheck(f, [x, w, b], backward, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 16, 8, 8, 1), (2, 5, 11, 9, 0), (1, 33, 7, 6, 2), (5, 3, 16, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_relu_and_max_pool_match_the_separate_ops(shape, dtype, forced):
    # the pool's windows are the output tiles; odd sizes leave a last row or column in none
    n, c, h, w_, padding = shape
    x, w, b = _arrays(n, c, h, w_, 40, dtype, h * w_)
    ref = np.maximum(naive_conv(x, w, b, 1, padding, 1, 1), 0).astype(dtype)
    y = fastkern.conv2d(x, w, b, padding=padding, activation="relu")
    np.testing.assert_allclose(y, ref, **_tol(dtype, 6))
    pooled, idx = fastkern.conv2d(x, w, b, padding=padding, activation="relu", max_pool=2)
    want, want_idx = fastkern.max_pool2d(y, 2, return_indices=True)
    np.testing.assert_array_equal(pooled, want)
    np.testing.assert_array_equal(idx[want > 0], want_idx[want > 0])  # ties of zeros may pick either
    g = np.random.default_rng(1).standard_normal(pooled.shape).astype(dtype)
    got = fastkern.conv2d_backward(g, x, w, padding=padding, activation="relu", output=pooled, pool_indices=idx)
    gy = fastkern.max_pool2d_backward(g, idx, y.shape, 2) * (y > 0)
    want_dx = naive_conv(gy, np.flip(w, (2, 3)).transpose(1, 0, 2, 3).copy(), None, 1, 2 - padding, 1, 1)
    np.testing.assert_allclose(got[0], want_dx, **_tol(dtype, 20))
    np.testing.assert_allclose(got[1], naive_conv_grad_w(gy, x, w, 1, padding), **_tol(dtype, 20))
    np.testing.assert_allclose(got[2], gy.sum(axis=(0, 2, 3)), **_tol(dtype, 20))
    plain = fastkern.conv2d_backward(gy, x, w, padding=padding)
    for a, r in zip(got, plain):
        np.testing.assert_allclose(a, r, **_tol(dtype, 20))


@pytest.mark.parametrize("chunk_bytes", [120 << 10, 240 << 10], ids=["one-tile-row-bands", "two-row-bands"])
def test_large_samples_split_into_bands_of_tile_rows(chunk_bytes, forced, monkeypatch):
    # a sample whose tiles pass the chunk budget runs in bands of tile rows: odd sizes, the fused
    # pool, grad input added back across band edges
    monkeypatch.setattr(winograd, "_CHUNK_BYTES", chunk_bytes)
    x, w, b = _arrays(3, 5, 13, 11, 6, np.float64, 8)
    plan = winograd.Plan(3, 5, 6, (1, 1), (13, 11), np.dtype(np.float64), 2, True)
    assert plan.fits and plan.geo[12] < plan.geo[4]  # fewer tile rows per band than the sample has
    np.testing.assert_allclose(fastkern.conv2d(x, w, b, padding=1), naive_conv(x, w, b, 1, 1, 1, 1), **_tol(np.float64))
    pooled, idx = fastkern.conv2d(x, w, b, padding=1, activation="relu", max_pool=2)
    y = np.maximum(naive_conv(x, w, b, 1, 1, 1, 1), 0)
    np.testing.assert_allclose(pooled, fastkern.max_pool2d(y, 2), **_tol(np.float64))
    g = np.random.default_rng(2).standard_normal(pooled.shape)
    got = fastkern.conv2d_backward(g, x, w, padding=1, activation="relu", output=pooled, pool_indices=idx)
    gy = fastkern.max_pool2d_backward(g, idx, y.shape, 2) * (y > 0)
    want_dx = naive_conv(gy, np.flip(w, (2, 3)).transpose(1, 0, 2, 3).copy(), None, 1, 1, 1, 1)
    np.testing.assert_allclose(got[0], want_dx, **_tol(np.float64))
    np.testing.assert_allclose(got[1], naive_conv_grad_w(gy, x, w, 1, 1), **_tol(np.float64))


def test_pool_indices_outside_their_window_are_rejected(forced):
    x, w, b = _arrays(2, 4, 8, 8, 3, np.float64, 0)
    pooled, idx = fastkern.conv2d(x, w, b, padding=1, max_pool=2)
    bad = idx.copy()
    bad[1, 2, 0, 0] = 63  # the last element of the plane: not in window (0, 0)
    with pytest.raises(ValueError, match="1 of pool_indices' .* outside their 2x2 window"):
        fastkern.conv2d_backward(np.ones_like(pooled), x, w, padding=1, pool_indices=bad)


def test_backward_without_input_or_bias_grad(forced):
    x, w, b = _arrays(3, 5, 9, 9, 6, np.float64, 2)
    gy = np.random.default_rng(3).standard_normal((3, 6, 9, 9))
    full = fastkern.conv2d_backward(gy, x, w, padding=1)
    dx, dw, db = fastkern.conv2d_backward(gy, x, w, padding=1, input_grad=False, bias_grad=False)
    assert dx is None and db is None
    np.testing.assert_array_equal(dw, full[1])


def test_results_are_deterministic_and_ignore_non_finite_workspaces(forced):
    x, w, b = _arrays(7, 16, 10, 10, 20, np.float32, 4)
    gy = np.random.default_rng(5).standard_normal((7, 20, 10, 10)).astype(np.float32)
    first = [fastkern.conv2d(x, w, b, padding=1), *fastkern.conv2d_backward(gy, x, w, padding=1)]
    for ws in conv_mod._workspaces.values():
        if ws.dtype.kind == "f":
            ws[:] = np.nan
    again = [fastkern.conv2d(x, w, b, padding=1), *fastkern.conv2d_backward(gy, x, w, padding=1)]
    for a, r in zip(again, first):
        np.testing.assert_array_equal(a, r)


@pytest.mark.skipif(max_threads() < 2, reason="needs two threads")
def test_thread_count_changes_no_forward_bit_and_only_the_weight_gradients_sum_order(forced):
    # the kernels' transforms are split over the threads by rows (odd counts here), the forward's
    # chunks by samples: neither may change a result; the backward's per-thread partials of dU and
    # the bias only change their summation order
    x, w, b = _arrays(5, 5, 9, 7, 33, np.float32, 6)
    gy = np.random.default_rng(7).standard_normal((5, 33, 9, 7)).astype(np.float32)
    got = {}
    for n in (1, 2):
        with fastkern.threads(n):
            got[n] = [fastkern.conv2d(x, w, b, padding=1), *fastkern.conv2d_backward(gy, x, w, padding=1)]
    np.testing.assert_array_equal(got[2][0], got[1][0])
    np.testing.assert_array_equal(got[2][1], got[1][1])  # grad input: each sample on one thread
    for a, r in zip(got[2][2:], got[1][2:]):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


def test_chosen_for_3x3_stride_1_layers_whose_channels_fill_the_panels():
    def uses(x, w, **kw):
        fastkern.conv2d(x, w, **kw)
        return next(c for c in reversed(conv_mod._CALLS.values())).wino is not None

    wide = np.ones((2, 32, 8, 8), np.float32)
    w = np.ones((48, 32, 3, 3), np.float32)
    assert uses(wide, w, padding=1)
    assert not uses(wide[:, :16], w[:16, :16], padding=1)  # padded to 32 x 32: 4x the multiply-adds
    assert not uses(wide, w, padding=1, stride=2)
    assert not uses(wide, w, padding=1, dilation=2)
    assert not uses(wide[:, :3], w[:, :3], padding=1)  # a first layer: the transforms would dominate
    assert not uses(wide, np.ones((48, 32, 5, 5), np.float32), padding=2)


def test_forward_and_gradients_match_torch(forced):
    torch = pytest.importorskip("torch")
    x, w, b = _arrays(3, 20, 9, 12, 36, np.float32, 9)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(xt, wt, bt, padding=1)), 2)
    g = np.random.default_rng(0).standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(g))
    pooled, idx = fastkern.conv2d(x, w, b, padding=1, activation="relu", max_pool=2)
    np.testing.assert_allclose(pooled, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    got = fastkern.conv2d_backward(g, x, w, padding=1, activation="relu", output=pooled, pool_indices=idx)
    for a, t in zip(got, (xt, wt, bt)):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-4, atol=1e-3)

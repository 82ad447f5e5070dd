import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern
from fastkern.testing import gradcheck


def naive_linear(x, w, b):
    n, m = x.shape[0], w.shape[0]
    y = np.zeros((n, m), np.float64)
    for i in range(n):
        for j in range(m):
            y[i, j] = np.dot(x[i].astype(np.float64), w[j].astype(np.float64))
            if b is not None:
                y[i, j] += b[j]
    return y


def make(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 9), fin=st.integers(0, 13), fout=st.integers(0, 11),
    has_bias=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
)
def test_linear_forward_and_backward_match_naive_numpy(n, fin, fout, has_bias, dtype):
    rng = np.random.default_rng(n * 1000 + fin * 10 + fout)
    x, w = make(rng, (n, fin), dtype), make(rng, (fout, fin), dtype)
    b = make(rng, fout, dtype) if has_bias else None
    tol = 1e-4 if dtype == np.float32 else 1e-12
    y = fastkern.linear(x, w, b)
    assert y.shape == (n, fout) and y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_allclose(y, naive_linear(x, w, b), rtol=tol, atol=tol)

    gy = make(rng, (n, fout), dtype)
    gx, gw, gb = fastkern.linear_backward(gy, x, w, bias_grad=has_bias)
    g64, x64, w64 = gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    ref_gx = np.array([[sum(g64[i, j] * w64[j, k] for j in range(fout)) for k in range(fin)]
                       for i in range(n)]).reshape(n, fin)
    ref_gw = np.array([[sum(g64[i, j] * x64[i, k] for i in range(n)) for k in range(fin)]
                       for j in range(fout)]).reshape(fout, fin)
    np.testing.assert_allclose(gx, ref_gx, rtol=tol, atol=tol)
    np.testing.assert_allclose(gw, ref_gw, rtol=tol, atol=tol)
    if has_bias:
        np.testing.assert_allclose(gb, g64.sum(axis=0), rtol=tol, atol=tol)
        assert gb.dtype == dtype
    else:
        assert gb is None


def test_linear_gradcheck_float64():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((6, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    gradcheck(fastkern.linear, [x, w, b],
              lambda gy, x, w, b: fastkern.linear_backward(gy, x, w))


@pytest.mark.parametrize("n, fout", [(1000, 37), (2000, 40)])
def test_linear_bias_over_many_row_chunks_serial_and_parallel(n, fout):
    # More rows than one chunk of the column-sum kernel, in float32; the second shape is past
    # the size where the bias broadcast and the bias gradient go parallel.
    rng = np.random.default_rng(2)
    gy = rng.standard_normal((n, fout)).astype(np.float32)
    x, w, b = make(rng, (n, 3), np.float32), make(rng, (fout, 3), np.float32), make(rng, fout, np.float32)
    _, _, gb = fastkern.linear_backward(gy, x, w)
    np.testing.assert_allclose(gb, gy.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fastkern.linear(x, w, b), naive_linear(x, w, b), rtol=1e-5, atol=1e-5)
    # both column-sum kernels add the same chunks in the same order
    lin = importlib.import_module("fastkern.linear")
    par, ser = np.empty(fout, np.float32), np.empty(fout, np.float32)
    lin._column_sums(gy, par)
    lin._column_sums_serial(gy, ser)
    np.testing.assert_array_equal(par, ser)


def test_linear_accepts_strided_views_and_does_not_modify_inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 10))[:, ::2]          # non-contiguous rows
    w = np.asfortranarray(rng.standard_normal((3, 5)))
    b = rng.standard_normal(6)[::2]
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    np.testing.assert_allclose(fastkern.linear(x, w, b), naive_linear(x, w, b), atol=1e-12)
    gy = rng.standard_normal((3, 7)).T                # transposed grad_y
    gx, gw, gb = fastkern.linear_backward(gy, x, w)
    np.testing.assert_allclose(gx, gy @ w, atol=1e-12)
    np.testing.assert_allclose(gw, gy.T @ x, atol=1e-12)
    np.testing.assert_allclose(gb, gy.sum(0), atol=1e-12)
    assert np.array_equal(x, x0) and np.array_equal(w, w0) and np.array_equal(b, b0)


def test_linear_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x, w, b = make(rng, (8, 12), np.float32), make(rng, (5, 12), np.float32), make(rng, 5, np.float32)
    np.testing.assert_allclose(
        fastkern.linear(x, w, b),
        torch.nn.functional.linear(*map(torch.from_numpy, (x, w, b))).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, exc, match", [
    ((np.ones((2, 3)), np.ones((4, 5))), ValueError, r"x.shape=\(2, 3\).*weight.shape=\(4, 5\)"),
    ((np.ones(3), np.ones((4, 3))), ValueError, "x must be 2-D"),
    ((np.ones((2, 3)), np.ones((4, 3, 1))), ValueError, "weight must be 2-D"),
    ((np.ones((2, 3)), np.ones((4, 3)), np.ones(5)), ValueError, "bias must have length 4"),
    ((np.ones((2, 3)), np.ones((4, 3)), np.ones((4, 1))), ValueError, "bias must be 1-D"),
    ((np.ones((2, 3), np.float32), np.ones((4, 3))), TypeError, "mixed dtypes"),
    ((np.ones((2, 3)), np.ones((4, 3)), np.ones(4, np.float32)), TypeError, "mixed dtypes"),
    ((np.ones((2, 3), np.int64), np.ones((4, 3))), TypeError, "float32 or float64"),
    (([[1.0, 2.0]], np.ones((4, 2))), TypeError, "numpy.ndarray"),
])
def test_linear_rejects_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        fastkern.linear(*args)


@pytest.mark.parametrize("gy, exc, match", [
    (np.ones((2, 5)), ValueError, r"grad_y has shape \(2, 5\), expected \(2, 4\)"),
    (np.ones(8), ValueError, "grad_y must be 2-D"),
    (np.ones((2, 4), np.float32), TypeError, "mixed dtypes"),
])
def test_linear_backward_rejects_bad_grad_y(gy, exc, match):
    with pytest.raises(exc, match=match):
        fastkern.linear_backward(gy, np.ones((2, 3)), np.ones((4, 3)))


def test_linear_backward_rejects_in_features_mismatch():
    with pytest.raises(ValueError, match="in_features"):
        fastkern.linear_backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((4, 2)))

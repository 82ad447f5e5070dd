import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern as fk
from fastkern import activations
from fastkern.testing import gradcheck

SETTINGS = settings(max_examples=25, deadline=None)
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from([np.float32, np.float64])


def _x(shape, dtype=np.float64, seed=0, scale=2.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    x[np.abs(x) < 1e-2] += 0.1  # keep kinks away from finite-difference steps
    return x.astype(dtype)


# ---- naive references


def ref_sigmoid(x):
    return np.array([1 / (1 + np.exp(-v)) if v >= 0 else np.exp(v) / (1 + np.exp(v)) for v in x.ravel()],
                    dtype=x.dtype).reshape(x.shape)


def ref_softmax(x, axis):
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def ref_log_softmax(x, axis):
    x64 = x.astype(np.float64)
    m = x64.max(axis=axis, keepdims=True)
    return x64 - m - np.log(np.exp(x64 - m).sum(axis=axis, keepdims=True))


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


# ---- forward values vs references, on both the serial and the parallel paths

ELEMENTWISE = [
    (fk.relu, lambda x: np.where(x < 0, 0, x)),
    (lambda x, out=None: fk.leaky_relu(x, 0.2, out=out), lambda x: np.where(x > 0, x, 0.2 * x)),
    (fk.sigmoid, ref_sigmoid),
    (fk.tanh, np.tanh),
]


@pytest.mark.parametrize("op,ref", ELEMENTWISE)
@pytest.mark.parametrize("size", [7, activations.PARALLEL_MIN + 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_forward_matches_reference(op, ref, size, dtype):
    x = _x((size,), dtype)
    y = op(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ref(x), **tol(dtype))
    inplace = x.copy()
    assert op(inplace, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, y)


@pytest.mark.parametrize("size", [5, activations.PARALLEL_MIN + 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_backward_matches_reference(size, dtype):
    x, g = _x((size,), dtype, 1), _x((size,), dtype, 2)
    np.testing.assert_array_equal(fk.relu_backward(g, x), np.where(x > 0, g, 0))
    np.testing.assert_allclose(fk.leaky_relu_backward(g, x, 0.3), np.where(x > 0, g, 0.3 * g), **tol(dtype))
    y = fk.sigmoid(x)
    np.testing.assert_allclose(fk.sigmoid_backward(g, y), g * y * (1 - y), **tol(dtype))
    y = fk.tanh(x)
    np.testing.assert_allclose(fk.tanh_backward(g, y), g * (1 - y * y), **tol(dtype))
    gi = g.copy()
    assert fk.relu_backward(gi, x, out=gi) is gi
    np.testing.assert_array_equal(gi, np.where(x > 0, g, 0))


def test_non_contiguous_input_is_handled():
    x = _x((6, 8))[:, ::2]
    np.testing.assert_array_equal(fk.relu(x), np.maximum(x, 0))
    np.testing.assert_allclose(fk.softmax(x.T, axis=0), ref_softmax(x.T, 0), rtol=1e-12)


@SETTINGS
@given(shape=shapes, dtype=dtypes, data=st.data())
def test_softmax_and_log_softmax_match_reference(shape, dtype, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _x(shape, dtype, 3)
    np.testing.assert_allclose(fk.softmax(x, axis), ref_softmax(x, axis), **tol(dtype))
    np.testing.assert_allclose(fk.log_softmax(x, axis), ref_log_softmax(x, axis), **tol(dtype))


@pytest.mark.parametrize("shape,axis", [((300, 300), -1), ((40, 30, 20), 1), ((20, 7, 30, 30), 1)])
def test_softmax_parallel_paths(shape, axis):
    x = _x(shape, np.float32, 4)
    np.testing.assert_allclose(fk.softmax(x, axis), ref_softmax(x, axis), rtol=1e-5, atol=1e-7)
    y = fk.log_softmax(x, axis)
    np.testing.assert_allclose(y, ref_log_softmax(x, axis), rtol=1e-5, atol=1e-5)
    g = _x(shape, np.float32, 5)
    want = g - np.exp(y.astype(np.float64)) * g.sum(axis, keepdims=True, dtype=np.float64)
    np.testing.assert_allclose(fk.log_softmax_backward(g, y, axis), want, rtol=1e-4, atol=1e-5)


# ---- gradients vs float64 finite differences


@SETTINGS
@given(shape=shapes)
def test_elementwise_gradcheck(shape):
    x = _x(shape, seed=6)
    gradcheck(fk.relu, [x], lambda g, x: (fk.relu_backward(g, x),))
    gradcheck(lambda x: fk.leaky_relu(x, 0.1), [x], lambda g, x: (fk.leaky_relu_backward(g, x, 0.1),))
    gradcheck(fk.sigmoid, [x], lambda g, x: (fk.sigmoid_backward(g, fk.sigmoid(x)),))
    gradcheck(fk.tanh, [x], lambda g, x: (fk.tanh_backward(g, fk.tanh(x)),))


@SETTINGS
@given(shape=shapes, data=st.data())
def test_softmax_gradcheck(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _x(shape, seed=7)
    gradcheck(lambda x: fk.softmax(x, axis), [x], lambda g, x: (fk.softmax_backward(g, fk.softmax(x, axis), axis),))
    gradcheck(lambda x: fk.log_softmax(x, axis), [x],
              lambda g, x: (fk.log_softmax_backward(g, fk.log_softmax(x, axis), axis),))


@SETTINGS
@given(n=st.integers(1, 4), c=st.integers(1, 5), spatial=st.lists(st.integers(1, 4), max_size=2))
def test_bias_relu_matches_reference_and_gradcheck(n, c, spatial):
    shape = (n, c, *spatial)
    x, b = _x(shape, seed=8), _x((c,), seed=9)
    bb = b.reshape((c,) + (1,) * len(spatial))
    y = fk.bias_relu(x, b)
    np.testing.assert_allclose(y, np.maximum(x + bb, 0), rtol=1e-13)
    g = _x(shape, seed=10)
    gx, gb = fk.bias_relu_backward(g, y)
    np.testing.assert_allclose(gx, np.where(x + bb > 0, g, 0), rtol=1e-13)
    np.testing.assert_allclose(gb, gx.sum(axis=tuple(i for i in range(len(shape)) if i != 1)), rtol=1e-12, atol=1e-12)
    gradcheck(lambda x, b: fk.bias_relu(x, b), [x, b], lambda g, x, b: fk.bias_relu_backward(g, fk.bias_relu(x, b)))


@pytest.mark.parametrize("shape", [(64, 6, 28, 28), (4096, 40)])
def test_bias_relu_parallel_paths(shape):
    x = _x(shape, np.float32, 11)
    b = _x((shape[1],), np.float32, 12)
    bb = b.reshape((shape[1],) + (1,) * (len(shape) - 2))
    y = fk.bias_relu(x, b)
    np.testing.assert_array_equal(y, np.maximum(x + bb, 0))
    g = _x(shape, np.float32, 13)
    gx, gb = fk.bias_relu_backward(g, y)
    np.testing.assert_array_equal(gx, np.where(y > 0, g, 0))
    axes = tuple(i for i in range(len(shape)) if i != 1)
    np.testing.assert_allclose(gb, gx.sum(axis=axes, dtype=np.float64), rtol=1e-4, atol=1e-3)
    xi = x.copy()
    fk.bias_relu(xi, b, out=xi)
    np.testing.assert_array_equal(xi, y)


# ---- stability


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_inputs_are_finite(dtype):
    x = np.array([[-1e4, 0.0, 1e4], [1e4, 1e4, -1e4]], dtype)
    for y in (fk.sigmoid(x), fk.tanh(x), fk.softmax(x), fk.log_softmax(x), fk.softmax(x, 0)):
        assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(fk.sigmoid(x)[0], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(fk.softmax(x)[1], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(fk.log_softmax(x)[0], [-2e4, -1e4, 0.0])


def test_against_torch():
    torch = pytest.importorskip("torch")
    x = _x((5, 7, 3), np.float64, 14)
    tx = torch.tensor(x)
    for ours, theirs in [
        (fk.softmax(x, 1), torch.softmax(tx, 1)),
        (fk.log_softmax(x, -1), torch.log_softmax(tx, -1)),
        (fk.sigmoid(x), torch.sigmoid(tx)),
        (fk.leaky_relu(x, 0.05), torch.nn.functional.leaky_relu(tx, 0.05)),
    ]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-14)


# ---- bad input


def test_bad_inputs_raise():
    x32, x64 = np.ones((2, 3), np.float32), np.ones((2, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        fk.relu(np.ones(3, np.int32))
    with pytest.raises(TypeError, match="ndarray"):
        fk.sigmoid([1.0, 2.0])
    with pytest.raises(TypeError, match="mixed dtypes"):
        fk.relu_backward(x32, x64)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fk.tanh_backward(x64, np.ones((3, 2)))
    with pytest.raises(ValueError, match="out has shape"):
        fk.relu(x64, out=np.empty((3, 2)))
    with pytest.raises(TypeError, match="out has dtype"):
        fk.relu(x64, out=np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="partially overlaps"):
        big = np.ones(7)
        fk.relu(big[:6], out=big[1:])
    with pytest.raises(ValueError, match="axis=2"):
        fk.softmax(x64, axis=2)
    with pytest.raises(TypeError, match="axis"):
        fk.log_softmax(x64, axis=0.5)
    with pytest.raises(ValueError, match="axis=-3"):
        fk.softmax_backward(x64, x64, axis=-3)
    with pytest.raises(ValueError, match="bias has shape"):
        fk.bias_relu(x64, np.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        fk.bias_relu(x64, np.ones((3, 1)))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fk.bias_relu(np.ones(3), np.ones(3))
    with pytest.raises(TypeError, match="mixed dtypes"):
        fk.bias_relu(x32, np.ones(3))
    with pytest.raises(TypeError, match="negative_slope"):
        fk.leaky_relu(x64, "0.1")

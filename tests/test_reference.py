"""The NumPy tier against the kernels: same arguments, same results (pool indices exactly)."""
import numpy as np
import pytest

import fastkern as fk
from fastkern import conv as kconv
from fastkern import reference as ref

RNG = np.random.default_rng(7)


def _close(a, b, dtype):
    tol = 2e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


CONV2D_CASES = [
    # x shape, weight shape, kwargs
    ((3, 1, 12, 12), (6, 1, 5, 5), dict(padding=2)),
    ((2, 6, 9, 11), (16, 6, 5, 5), {}),
    ((2, 4, 10, 9), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2)),
    ((1, 3, 11, 13), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ((2, 3, 7, 7), (5, 3, 3, 3), dict(padding="same", dilation=2)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, ws, kw", CONV2D_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_and_its_backward_match_the_kernels(xs, ws, kw, relu, dtype):
    x, w = RNG.standard_normal(xs).astype(dtype), RNG.standard_normal(ws).astype(dtype)
    b = RNG.standard_normal(ws[0]).astype(dtype)
    act = "relu" if relu else None
    y = kconv.conv2d(x, w, b, activation=act, **kw)
    _close(ref.conv2d(x, w, b, activation=act, **kw), y, dtype)
    gy = RNG.standard_normal(y.shape).astype(dtype)
    out = y if relu else None
    for got, want in zip(ref.conv2d_backward(gy, x, w, activation=act, output=out, **kw),
                         kconv.conv2d_backward(gy, x, w, activation=act, output=out, **kw)):
        _close(got, want, dtype)


@pytest.mark.parametrize("xs, ws, kw", CONV2D_CASES[:3])
def test_the_fused_max_pool_gives_the_kernels_indices_and_gradients(xs, ws, kw):
    x, w = RNG.standard_normal(xs).astype(np.float32), RNG.standard_normal(ws).astype(np.float32)
    b = RNG.standard_normal(ws[0]).astype(np.float32)
    pooled, idx = kconv.conv2d(x, w, b, activation="relu", max_pool=2, **kw)
    rpooled, ridx = ref.conv2d(x, w, b, activation="relu", max_pool=2, **kw)
    _close(rpooled, pooled, np.float32)
    # a ReLU'd window of zeros ties; elsewhere the argmax is one element
    live = pooled > 0
    np.testing.assert_array_equal(ridx[live], idx[live])
    gy = RNG.standard_normal(pooled.shape).astype(np.float32)
    args = dict(activation="relu", output=pooled, pool_indices=idx, **kw)
    for got, want in zip(ref.conv2d_backward(gy, x, w, **args), kconv.conv2d_backward(gy, x, w, **args)):
        _close(got, want, np.float32)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv1d_and_conv3d_match_the_kernels(nd):
    x = RNG.standard_normal((2, 4) + (7,) * nd)
    w = RNG.standard_normal((6, 2) + (3,) * nd)
    kw = dict(stride=2, padding=1, groups=2)
    fwd, bwd = getattr(kconv, f"conv{nd}d"), getattr(kconv, f"conv{nd}d_backward")
    y = fwd(x, w, **kw)
    _close(getattr(ref, f"conv{nd}d")(x, w, **kw), y, np.float64)
    gy = RNG.standard_normal(y.shape)
    for got, want in zip(getattr(ref, f"conv{nd}d_backward")(gy, x, w, **kw), bwd(gy, x, w, **kw)):
        _close(got, want, np.float64)


def test_linear_activations_loss_and_sgd_match_the_kernels():
    x, w = RNG.standard_normal((9, 7)).astype(np.float32), RNG.standard_normal((5, 7)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float32)
    y = ref.linear(x, w, b)
    _close(y, fk.linear(x, w, b), np.float32)
    gy = RNG.standard_normal(y.shape).astype(np.float32)
    for got, want in zip(ref.linear_backward(gy, x, w), fk.linear_backward(gy, x, w)):
        _close(got, want, np.float32)
    z = RNG.standard_normal((4, 3, 5)).astype(np.float32)
    c = RNG.standard_normal(3).astype(np.float32)
    _close(ref.relu(z), fk.relu(z), np.float32)
    _close(ref.relu_backward(gy[:4, :3], y[:4, :3]), fk.relu_backward(gy[:4, :3], y[:4, :3]), np.float32)
    _close(ref.bias_relu(z, c), fk.bias_relu(z, c), np.float32)
    g = RNG.standard_normal(z.shape).astype(np.float32)
    for got, want in zip(ref.bias_relu_backward(g, fk.bias_relu(z, c)), fk.bias_relu_backward(g, fk.bias_relu(z, c))):
        _close(got, want, np.float32)
    labels = np.array([0, 4, 2, 1, 3, 0, 0, 1, 2])
    for reduction in ("mean", "sum", "none"):
        (l1, g1), (l2, g2) = ref.softmax_cross_entropy(y, labels, reduction), \
            fk.softmax_cross_entropy(y, labels, reduction)
        _close(l1, l2, np.float32)
        _close(g1, g2, np.float32)
    for kw in (dict(momentum=0.9, first_step=True), dict(momentum=0.9, nesterov=True, weight_decay=0.1),
               dict(momentum=0.5, dampening=0.2, l1=0.01), {}):
        gw = RNG.standard_normal(w.shape).astype(np.float32)
        p1, buf1 = w.copy(), np.full_like(w, 0.3)
        p2, buf2 = w.copy(), buf1.copy()
        ref.sgd_update(p1, gw, buf1, lr=0.1, **kw)
        fk.sgd_update(p2, gw, buf2, lr=0.1, **kw)
        _close(p1, p2, np.float32)
        _close(buf1, buf2, np.float32)


def test_bad_arguments_get_the_kernels_errors():
    x, w = np.zeros((1, 3, 8, 8), np.float32), np.zeros((4, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="channels"):
        ref.conv2d(x, w)
    with pytest.raises(TypeError, match="mixed dtypes"):
        ref.linear(np.zeros((2, 3)), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="grad_y has shape"):
        ref.linear_backward(np.zeros((2, 5), np.float32), np.zeros((2, 3), np.float32),
                            np.zeros((4, 3), np.float32))


@pytest.mark.parametrize("kw", [dict(step=1), dict(step=3, weight_decay=0.1, amsgrad=True),
                                dict(step=2, decoupled_weight_decay=0.05, l1=0.01)])
def test_adam_matches_the_kernel(kw):
    p, g = RNG.standard_normal(33).astype(np.float32), RNG.standard_normal(33).astype(np.float32)
    states = [RNG.random(33).astype(np.float32) for _ in range(3)]
    a, b = [p.copy()] + [s.copy() for s in states], [p.copy()] + [s.copy() for s in states]
    ref.adam_update(a[0], g, *a[1:], lr=0.01, **kw)
    fk.adam_update(b[0], g, *b[1:], lr=0.01, **kw)
    for x, y in zip(a, b):
        _close(x, y, np.float32)


@pytest.mark.parametrize("kw", [{}, dict(momentum=0.9, centered=True), dict(weight_decay=0.1, l1=0.01)])
def test_rmsprop_matches_the_kernel(kw):
    p, g = RNG.standard_normal(33).astype(np.float32), RNG.standard_normal(33).astype(np.float32)
    states = [RNG.random(33).astype(np.float32) for _ in range(3)]
    states[1] *= 0.1  # centered: grad_avg**2 below square_avg
    a, b = [p.copy()] + [s.copy() for s in states], [p.copy()] + [s.copy() for s in states]
    ref.rmsprop_update(a[0], g, *a[1:], lr=0.01, **kw)
    fk.rmsprop_update(b[0], g, *b[1:], lr=0.01, **kw)
    for x, y in zip(a, b):
        _close(x, y, np.float32)

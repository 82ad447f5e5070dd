import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern
from fastkern.testing import gradcheck


def ref_penalty(w, l1, l2):
    w = w.astype(np.float64)
    return sum(l1 * abs(v) + 0.5 * l2 * v * v for v in w.reshape(-1))


def ref_grad(w, l1, l2):
    w64 = w.astype(np.float64)
    return np.where(w64 > 0, l1, np.where(w64 < 0, -l1, 0.0)) + l2 * w64


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(0,), (7,), (3, 4), (2, 3, 5), (20000,)]),
       dtype=st.sampled_from([np.float32, np.float64]),
       lam=st.floats(0, 3), ratio=st.floats(0, 1), seed=st.integers(0, 50))
def test_penalties_and_grads_match_reference(shape, dtype, lam, ratio, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(dtype)
    w.reshape(-1)[::3] = 0  # exact zeros take the 0 subgradient
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    cases = [
        (fastkern.l1_penalty(w, lam), fastkern.l1_grad(w, lam), lam, 0.0),
        (fastkern.l2_penalty(w, lam), fastkern.l2_grad(w, lam), 0.0, lam),
        (fastkern.elastic_net_penalty(w, lam, ratio), fastkern.elastic_net_grad(w, lam, ratio),
         lam * ratio, lam * (1 - ratio)),
    ]
    for pen, grad, l1, l2 in cases:
        assert isinstance(pen, float)
        np.testing.assert_allclose(pen, ref_penalty(w, l1, l2), **tol)
        assert grad.shape == w.shape and grad.dtype == dtype
        np.testing.assert_allclose(grad, ref_grad(w, l1, l2), **tol)

    grad = rng.standard_normal(shape).astype(dtype)
    expected = grad.astype(np.float64) + ref_grad(w, lam * ratio, lam)
    assert fastkern.add_regularization_grad(grad, w, l1=lam * ratio, l2=lam) is grad
    np.testing.assert_allclose(grad, expected, **tol)


def test_gradients_match_finite_differences_away_from_zero():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 5))
    w[np.abs(w) < 0.05] = 0.5  # |w| is not differentiable at 0
    for pen, grad in [
        (lambda w: fastkern.l1_penalty(w, 0.7), lambda w: fastkern.l1_grad(w, 0.7)),
        (lambda w: fastkern.l2_penalty(w, 0.7), lambda w: fastkern.l2_grad(w, 0.7)),
        (lambda w: fastkern.elastic_net_penalty(w, 0.7, 0.3), lambda w: fastkern.elastic_net_grad(w, 0.7, 0.3)),
    ]:
        gradcheck(lambda w: np.array(pen(w)), [w], lambda g, w: (g * grad(w),))


def test_subgradient_at_zero_is_zero_and_out_is_filled():
    w = np.zeros(5, np.float32)
    out = np.full(5, 7, np.float32)
    assert fastkern.l1_grad(w, 2.0, out=out) is out
    assert np.all(out == 0)
    assert fastkern.elastic_net_penalty(w, 1.0, 0.5) == 0.0


def test_add_regularization_grad_handles_aliasing_and_strided_w():
    w = np.arange(-3.0, 3.0)
    fastkern.add_regularization_grad(w, w, l1=1.0, l2=1.0)  # grad is w itself
    np.testing.assert_array_equal(w, np.arange(-3.0, 3.0) + ref_grad(np.arange(-3.0, 3.0), 1, 1))
    buf = np.arange(10.0)
    grad, wv = buf[:5], buf[3:8]  # overlapping views: the update reads w as it was
    w0, g0 = wv.copy(), grad.copy()
    fastkern.add_regularization_grad(grad, wv, l1=0.5)
    np.testing.assert_array_equal(grad, g0 + ref_grad(w0, 0.5, 0))
    g = np.zeros(4)
    fastkern.add_regularization_grad(g, np.arange(8.0)[::2], l2=2.0)
    np.testing.assert_array_equal(g, 2 * np.arange(8.0)[::2])


def test_penalty_does_not_depend_on_thread_count():
    w = np.random.default_rng(2).standard_normal(100_003).astype(np.float32)
    a = fastkern.elastic_net_penalty(w, 0.3, 0.4)
    with fastkern.threads(1):
        b = fastkern.elastic_net_penalty(w, 0.3, 0.4)
    assert a == b


def test_matches_torch_weight_decay_convention():
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(3).standard_normal(10)
    tw = torch.from_numpy(w.copy()).requires_grad_()
    (0.5 * 0.1 * (tw ** 2).sum() + 0.2 * tw.abs().sum()).backward()
    np.testing.assert_allclose(fastkern.add_regularization_grad(np.zeros(10), w, l1=0.2, l2=0.1),
                               tw.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fastkern.l1_penalty(np.ones(3), -1.0), ValueError, "lam must be >= 0, got -1.0"),
    (lambda: fastkern.l2_grad(np.ones(3), -0.5), ValueError, "lam must be >= 0"),
    (lambda: fastkern.elastic_net_penalty(np.ones(3), 1.0, 1.5), ValueError, r"l1_ratio must be in \[0, 1\], got 1.5"),
    (lambda: fastkern.elastic_net_grad(np.ones(3), 1.0, -0.1), ValueError, "l1_ratio"),
    (lambda: fastkern.l1_penalty(np.ones(3), "a"), TypeError, "lam must be a real number"),
    (lambda: fastkern.l1_penalty(np.ones(3, int), 1.0), TypeError, "float32 or float64"),
    (lambda: fastkern.l1_grad(np.ones(3), 1.0, out=np.ones(4)), ValueError, r"out has shape \(4,\)"),
    (lambda: fastkern.l1_grad(np.ones(3), 1.0, out=np.ones(3, np.float32)), TypeError, "out has dtype"),
    (lambda: fastkern.add_regularization_grad(np.ones(3, np.float32), np.ones(3), l1=1.0), TypeError,
     "mixed dtypes"),
    (lambda: fastkern.add_regularization_grad(np.ones(4), np.ones(3), l1=1.0), ValueError,
     r"grad has shape \(4,\), expected \(3,\)"),
    (lambda: fastkern.add_regularization_grad(np.ones((3, 4)).T, np.ones((4, 3)), l1=1.0), ValueError,
     "C-contiguous"),
    (lambda: fastkern.add_regularization_grad(np.ones(3), np.ones(3), l2=-1.0), ValueError, "l2 must be >= 0"),
])
def test_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

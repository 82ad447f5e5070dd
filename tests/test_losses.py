import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern as fk
from fastkern import losses
from fastkern.testing import gradcheck

SETTINGS = settings(max_examples=25, deadline=None)
REDUCTIONS = ["mean", "sum", "none"]


def _x(shape, dtype=np.float64, seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _labels(n, c, seed=1):
    return np.random.default_rng(seed).integers(0, c, n)


def _reduce(per, reduction):
    return per if reduction == "none" else (per.mean() if reduction == "mean" else per.sum())


# ---- naive references (float64, row by row)


def ref_ce(x, labels):
    out = []
    for row, k in zip(x.astype(np.float64), labels):
        m = row.max()
        out.append(m + np.log(np.exp(row - m).sum()) - row[k])
    return np.array(out)


def ref_bce(x, t):
    x, t = x.astype(np.float64), t.astype(np.float64)
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _check_loss(loss, want, reduction, rtol):
    if reduction == "none":
        np.testing.assert_allclose(loss, want, rtol=rtol, atol=rtol)
    else:
        assert isinstance(loss, float)
        np.testing.assert_allclose(loss, want, rtol=rtol)


# ---- values and finite-difference gradients on drawn shapes


@SETTINGS
@given(n=st.integers(1, 6), c=st.integers(1, 6), reduction=st.sampled_from(REDUCTIONS))
def test_softmax_cross_entropy(n, c, reduction):
    x, lab = _x((n, c), seed=n * 7 + c), _labels(n, c)
    loss, grad = fk.softmax_cross_entropy(x, lab, reduction)
    _check_loss(loss, _reduce(ref_ce(x, lab), reduction), reduction, 1e-12)
    gradcheck(lambda x: np.sum(_reduce(ref_ce(x, lab), reduction)), [x],
              lambda g, x: (g * fk.softmax_cross_entropy(x, lab, reduction)[1],))


@SETTINGS
@given(n=st.integers(1, 6), c=st.integers(1, 6), reduction=st.sampled_from(REDUCTIONS))
def test_nll_loss(n, c, reduction):
    lp, lab = fk.log_softmax(_x((n, c), seed=c)), _labels(n, c, 2)
    loss, grad = fk.nll_loss(lp, lab, reduction)
    _check_loss(loss, _reduce(-lp[np.arange(n), lab], reduction), reduction, 1e-12)
    gradcheck(lambda lp: np.sum(_reduce(-lp[np.arange(n), lab], reduction)), [lp],
              lambda g, lp: (g * fk.nll_loss(lp, lab, reduction)[1],))


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       reduction=st.sampled_from(REDUCTIONS))
def test_mse_and_bce_with_logits(shape, reduction):
    x, t = _x(shape, seed=3), _x(shape, seed=4)
    p = np.random.default_rng(5).uniform(0, 1, shape)
    loss, _ = fk.mse_loss(x, t, reduction)
    _check_loss(loss, _reduce((x - t) ** 2, reduction), reduction, 1e-12)
    loss, _ = fk.binary_cross_entropy_with_logits(x, p, reduction)
    _check_loss(loss, _reduce(ref_bce(x, p), reduction), reduction, 1e-12)
    # With 'none' the returned gradient is that of sum(per-element losses).
    gradcheck(lambda x: np.sum(_reduce((x - t) ** 2, reduction)), [x],
              lambda g, x: (g * fk.mse_loss(x, t, reduction)[1],))
    gradcheck(lambda x: np.sum(_reduce(ref_bce(x, p), reduction)), [x],
              lambda g, x: (g * fk.binary_cross_entropy_with_logits(x, p, reduction)[1],))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_paths_match_serial_references(dtype):
    n, c = losses.PARALLEL_MIN // 10 + 7, 10
    x, lab = _x((n, c), dtype, 6), _labels(n, c, 7)
    loss, grad = fk.softmax_cross_entropy(x, lab)
    np.testing.assert_allclose(loss, ref_ce(x, lab).mean(), rtol=1e-5)
    sm = np.exp(x - x.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    sm[np.arange(n), lab] -= 1
    np.testing.assert_allclose(grad, sm / n, rtol=1e-4, atol=1e-9)
    t = _x((n, c), dtype, 8)
    loss, grad = fk.mse_loss(x, t, "sum")
    np.testing.assert_allclose(loss, ((x - t).astype(np.float64) ** 2).sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, 2 * (x - t), rtol=1e-5)
    p = np.random.default_rng(9).uniform(0, 1, (n, c)).astype(dtype)
    loss, grad = fk.binary_cross_entropy_with_logits(x, p)
    np.testing.assert_allclose(loss, ref_bce(x, p).mean(), rtol=1e-5)
    np.testing.assert_allclose(grad, (1 / (1 + np.exp(-x.astype(np.float64))) - p) / (n * c), rtol=1e-4, atol=1e-10)


# ---- stability and edge cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_give_finite_loss_and_grad(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype)
    loss, grad = fk.softmax_cross_entropy(x, np.array([1, 2, 0]), "none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, [2e4, np.log(3), np.log(2)], rtol=1e-6)
    loss, grad = fk.binary_cross_entropy_with_logits(x, np.ones_like(x), "sum")
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, 5e4 + 4 * 0.0 + 1 * np.log(2), rtol=1e-6)


def test_mean_over_nothing_is_nan_like_torch():
    loss, grad = fk.softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64))
    assert np.isnan(loss) and grad.shape == (0, 3)
    assert fk.mse_loss(np.zeros(0), np.zeros(0), "sum")[0] == 0.0


def test_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, lab = _x((9, 5), seed=10), _labels(9, 5, 11)
    for reduction in REDUCTIONS:
        tx = torch.tensor(x, requires_grad=True)
        tl = F.cross_entropy(tx, torch.tensor(lab), reduction=reduction)
        tl.sum().backward()
        loss, grad = fk.softmax_cross_entropy(x, lab, reduction)
        np.testing.assert_allclose(loss, tl.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-12, atol=1e-15)
    t = np.random.default_rng(12).uniform(0, 1, x.shape)
    tx = torch.tensor(x, requires_grad=True)
    tl = F.binary_cross_entropy_with_logits(tx, torch.tensor(t))
    tl.backward()
    loss, grad = fk.binary_cross_entropy_with_logits(x, t)
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-10, atol=1e-15)


# ---- bad input


def test_bad_inputs_raise():
    x = np.zeros((4, 3))
    lab = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 3\]"):
        fk.softmax_cross_entropy(x, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        fk.nll_loss(x, np.array([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="integer dtype"):
        fk.softmax_cross_entropy(x, lab.astype(np.float64))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        fk.softmax_cross_entropy(x, lab[:3])
    with pytest.raises(ValueError, match="2-D"):
        fk.softmax_cross_entropy(np.zeros(3), lab)
    with pytest.raises(ValueError, match="reduction"):
        fk.softmax_cross_entropy(x, lab, "avg")
    with pytest.raises(ValueError, match="reduction"):
        fk.mse_loss(x, x, None)
    with pytest.raises(TypeError, match="mixed dtypes"):
        fk.mse_loss(x, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        fk.binary_cross_entropy_with_logits(x, np.zeros((4, 2)))
    with pytest.raises(TypeError, match="float32 or float64"):
        fk.nll_loss(x.astype(np.int64), lab)

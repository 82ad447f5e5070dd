import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkern
from fastkern.testing import gradcheck


# ----------------------------------------------------------------------------- references

def naive_batch_norm_train(x, gamma, beta, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    x = x.astype(np.float64)
    mean = x.mean(axis=axes)
    var = ((x - np.expand_dims(mean, axes)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - np.expand_dims(mean, axes)) * np.expand_dims(invstd * gamma, axes) + np.expand_dims(beta, axes)
    return y, mean, var


def channel_vec(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def params(rng, c, dtype):
    gamma = (rng.random(c) + 0.5).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = (rng.random(c) + 0.5).astype(dtype)
    return gamma, beta, rm, rv


SHAPES = [(6, 3), (4, 3, 5), (3, 2, 4, 3), (130, 4)]  # (130, 4) spans several row chunks


# ----------------------------------------------------------------------------- batch norm forward

@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(SHAPES + [(2, 5, 1, 1), (2, 1, 7)]),
       dtype=st.sampled_from([np.float32, np.float64]),
       momentum=st.floats(0.0, 1.0), offset=st.floats(-100, 100), seed=st.integers(0, 100))
def test_batch_norm_training_matches_naive_numpy_and_updates_running_stats(shape, dtype, momentum, offset, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + offset).astype(dtype)
    gamma, beta, rm, rv = params(rng, shape[1], dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    y, save_mean, save_invstd = fastkern.batch_norm(x, gamma, beta, rm, rv, True, momentum, 1e-5, True)
    ref, mean, var = naive_batch_norm_train(x, gamma, beta, 1e-5)
    tol = 2e-4 if dtype == np.float32 else 1e-10
    assert y.shape == x.shape and y.dtype == dtype
    # The output's own rounding: the saved mean is stored in the input's dtype, so y carries an
    # error of about eps * |mean| * gamma * invstd, large where a channel's spread is small
    # next to its mean (two samples 0.1 apart at an offset of 66, say).
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    cond = np.finfo(dtype).eps * np.abs(mean) * gamma / np.sqrt(var + 1e-5)
    np.testing.assert_array_less(np.abs(y - ref), tol * (1 + np.abs(ref)) + 4 * cond.reshape(bshape))
    np.testing.assert_allclose(save_mean, mean, rtol=tol, atol=tol * max(1, abs(offset)))
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(var + 1e-5), rtol=tol)
    count = x.size // shape[1]
    unbiased = var * count / (count - 1)
    np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * mean, rtol=tol, atol=tol * max(1, abs(offset)))
    np.testing.assert_allclose(rv, (1 - momentum) * rv0 + momentum * unbiased, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_eval_uses_running_stats_and_leaves_them_alone(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    gamma, beta, rm, rv = params(rng, shape[1], np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    y = fastkern.batch_norm(x, gamma, beta, rm, rv, False, eps=1e-3)
    n = x.ndim
    ref = (x - channel_vec(rm, n)) / np.sqrt(channel_vec(rv, n) + 1e-3) * channel_vec(gamma, n) + channel_vec(beta, n)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)


def test_batch_norm_without_affine_or_running_stats():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 4))
    y = fastkern.batch_norm(x, None, None, None, None, True)
    ref, _, _ = naive_batch_norm_train(x, np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(y, ref, atol=1e-12)


def test_batch_norm_strided_running_stats_are_updated_in_place():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3, 2))
    buf = np.ones((2, 3))
    rm, rv = buf[0, :], np.ones(6)[::2]
    fastkern.batch_norm(x, None, None, rm, rv, True, momentum=1.0)
    _, mean, var = naive_batch_norm_train(x, np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(buf[0], mean, atol=1e-12)
    np.testing.assert_allclose(rv, var * 16 / 15, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5), (4, 3, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch(shape, training):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    gamma, beta, rm, rv = params(rng, shape[1], np.float32)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tx = torch.from_numpy(x).requires_grad_()
    tg, tb = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    ty = F.batch_norm(tx, trm, trv, tg, tb, training, 0.3, 1e-4)
    gy = rng.standard_normal(shape).astype(np.float32)
    ty.backward(torch.from_numpy(gy))

    if training:
        y, m, s = fastkern.batch_norm(x, gamma, beta, rm, rv, True, 0.3, 1e-4, return_stats=True)
    else:
        y = fastkern.batch_norm(x, gamma, beta, rm, rv, False, 0.3, 1e-4)
        m, s = rm, (1 / np.sqrt(rv + np.float32(1e-4))).astype(np.float32)
    gx, gg, gb = fastkern.batch_norm_backward(gy, x, gamma, m, s, training=training)
    for ours, theirs in [(y, ty), (rm, trm), (rv, trv), (gx, tx.grad), (gg, tg.grad), (gb, tb.grad)]:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- batch norm backward

@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_training_gradcheck(shape):
    if shape[0] > 100:
        shape = (70, 2)  # two row chunks, fewer finite differences
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) * 2 + 0.5
    gamma, beta, _, _ = params(rng, shape[1], np.float64)

    def f(x, gamma, beta):
        return fastkern.batch_norm(x, gamma, beta, None, None, True, eps=1e-3)

    def backward(gy, x, gamma, beta):
        _, m, s = fastkern.batch_norm(x, gamma, beta, None, None, True, eps=1e-3, return_stats=True)
        return fastkern.batch_norm_backward(gy, x, gamma, m, s)

    gradcheck(f, [x, gamma, beta], backward, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 3)])
def test_batch_norm_eval_gradcheck(shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    gamma, beta, rm, rv = params(rng, shape[1], np.float64)

    def f(x, gamma, beta):
        return fastkern.batch_norm(x, gamma, beta, rm, rv, False, eps=1e-3)

    def backward(gy, x, gamma, beta):
        return fastkern.batch_norm_backward(gy, x, gamma, rm, 1 / np.sqrt(rv + 1e-3), training=False)

    gradcheck(f, [x, gamma, beta], backward)
    gx, _, _ = backward(np.ones(shape), x, gamma, beta)
    np.testing.assert_allclose(gx, np.broadcast_to(channel_vec(gamma / np.sqrt(rv + 1e-3), len(shape)), shape))


def test_batch_norm_backward_float32_matches_float64():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((9, 4, 3, 3)) + 5
    gy = rng.standard_normal(x.shape)
    gamma = rng.random(4) + 0.5
    out = []
    for dt in (np.float32, np.float64):
        args = [a.astype(dt) for a in (x, gamma)]
        _, m, s = fastkern.batch_norm(args[0], args[1], None, None, None, True, return_stats=True)
        out.append(fastkern.batch_norm_backward(gy.astype(dt), args[0], args[1], m, s))
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- batch norm errors

def _bn_args(**over):
    c = 3
    args = dict(x=np.ones((4, c, 2)), gamma=np.ones(c), beta=np.zeros(c),
                running_mean=np.zeros(c), running_var=np.ones(c), training=True)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=np.ones(4)), ValueError, "x must be 2 or 3 or 4-D"),
    (dict(x=np.ones((2, 3, 2, 2, 2))), ValueError, "x must be 2 or 3 or 4-D"),
    (dict(gamma=np.ones(4)), ValueError, r"gamma must have length 3"),
    (dict(beta=np.ones(2)), ValueError, r"beta must have length 3"),
    (dict(running_mean=np.ones(5)), ValueError, r"running_mean must have length 3"),
    (dict(running_var=np.ones((3, 1))), ValueError, r"running_var must be 1-D"),
    (dict(running_var=None), ValueError, "both running_mean and running_var"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "needs running_mean"),
    (dict(gamma=np.ones(3, np.float32)), TypeError, "mixed dtypes"),
    (dict(x=np.ones((4, 3, 2), np.float32)), TypeError, "mixed dtypes"),
    (dict(x=np.ones((1, 3))), ValueError, "more than 1 value per channel"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(x=np.ones((4, 3), np.int32)), TypeError, "float32 or float64"),
])
def test_batch_norm_rejects_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        fastkern.batch_norm(**_bn_args(**over))


def test_batch_norm_rejects_read_only_running_stats_in_training():
    rm = np.zeros(3)
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        fastkern.batch_norm(**_bn_args(running_mean=rm))


@pytest.mark.parametrize("args, exc, match", [
    ((np.ones((4, 3, 3)), np.ones((4, 3, 2)), None, np.zeros(3), np.ones(3)), ValueError,
     r"grad_y has shape \(4, 3, 3\), expected \(4, 3, 2\)"),
    ((np.ones((4, 3, 2)), np.ones((4, 3, 2)), np.ones(2), np.zeros(3), np.ones(3)), ValueError,
     "gamma must have length 3"),
    ((np.ones((4, 3, 2)), np.ones((4, 3, 2)), None, np.zeros(4), np.ones(3)), ValueError,
     "save_mean must have length 3"),
    ((np.ones((4, 3, 2)), np.ones((4, 3, 2)), None, np.zeros(3), None), ValueError, "save_invstd is required"),
    ((np.ones((4, 3, 2), np.float32), np.ones((4, 3, 2)), None, np.zeros(3), np.ones(3)), TypeError,
     "mixed dtypes"),
])
def test_batch_norm_backward_rejects_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        fastkern.batch_norm_backward(*args)


# ----------------------------------------------------------------------------- dropout

def test_dropout_keeps_about_one_minus_p_and_scales_inverted():
    x = np.random.default_rng(7).standard_normal((400, 500)).astype(np.float32)
    for p in (0.1, 0.5, 0.8):
        y, mask = fastkern.dropout(x, p, seed=123)
        assert mask.dtype == np.uint8 and mask.shape == x.shape
        assert set(np.unique(mask)) <= {0, 1}
        keep = mask.mean()
        # 200k Bernoulli draws: the standard error is < 0.0012.
        assert abs(keep - (1 - p)) < 0.006, (p, keep)
        np.testing.assert_allclose(y[mask == 1], x[mask == 1] * np.float32(1 / (1 - p)), rtol=1e-6)
        assert np.all(y[mask == 0] == 0)
        # Masks of neighbouring elements are not correlated (no striping).
        m = mask.reshape(-1).astype(np.float64)
        assert abs(np.corrcoef(m[:-1], m[1:])[0, 1]) < 0.01


def test_dropout_is_reproducible_per_seed_and_thread_count():
    x = np.random.default_rng(8).standard_normal((3, 70000))
    y1, m1 = fastkern.dropout(x, 0.3, seed=5)
    y2, m2 = fastkern.dropout(x, 0.3, seed=5)
    with fastkern.threads(1):
        y3, m3 = fastkern.dropout(x, 0.3, seed=5)
    assert np.array_equal(m1, m2) and np.array_equal(m1, m3) and np.array_equal(y1, y3)
    _, m4 = fastkern.dropout(x, 0.3, seed=6)
    assert not np.array_equal(m1, m4)
    # Independent masks for nearby seeds: agreement is p^2 + (1-p)^2 = 0.58.
    assert abs((m1 == m4).mean() - 0.58) < 0.01


def test_dropout_eval_or_p_zero_is_identity_copy():
    x = np.random.default_rng(9).standard_normal((4, 5))[:, ::2]
    for kwargs in (dict(p=0.5, training=False), dict(p=0.0)):
        y, mask = fastkern.dropout(x, seed=1, **kwargs)
        assert np.array_equal(y, x) and not np.shares_memory(y, x)
        assert mask.dtype == np.uint8 and np.all(mask == 1) and mask.shape == x.shape


def test_dropout_gradcheck_with_a_fixed_mask():
    x = np.random.default_rng(10).standard_normal((5, 6))
    p, seed = 0.4, 11
    _, mask = fastkern.dropout(x, p, seed)
    assert 0 < mask.sum() < mask.size
    gradcheck(lambda x: fastkern.dropout(x, p, seed)[0], [x],
              lambda gy, x: (fastkern.dropout_backward(gy, mask, p),))
    gy = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(fastkern.dropout_backward(gy, mask.astype(bool), p),
                               gy * mask / np.float32(1 - p), rtol=1e-6)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fastkern.dropout(np.ones(3), 1.0, 0), ValueError, r"p must be in \[0, 1\), got 1.0"),
    (lambda: fastkern.dropout(np.ones(3), -0.1, 0), ValueError, "p must be in"),
    (lambda: fastkern.dropout(np.ones(3), 0.5, -1), ValueError, "seed"),
    (lambda: fastkern.dropout(np.ones(3), 0.5, 1.5), TypeError, "seed must be an int"),
    (lambda: fastkern.dropout(np.ones(3, int), 0.5, 0), TypeError, "float32 or float64"),
    (lambda: fastkern.dropout_backward(np.ones(3), np.ones(4, np.uint8), 0.5), ValueError,
     r"mask has shape \(4,\), expected \(3,\)"),
    (lambda: fastkern.dropout_backward(np.ones(3), np.ones(3), 0.5), TypeError, "mask must be uint8 or bool"),
    (lambda: fastkern.dropout_backward(np.ones(3), np.ones(3, np.uint8), 1.2), ValueError, "p must be in"),
])
def test_dropout_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

"""fastkern's fused optimizer updates against float64 NumPy references of torch's formulas,
and against torch.optim itself when it is installed."""
import numpy as np
import pytest

import fastkern as fk
from fastkern.optim import PARALLEL_MIN_SIZE

SIZES = [7, PARALLEL_MIN_SIZE + 3]  # serial and parallel paths


def _data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    p[:3] = 0  # sign(0) = 0 for the L1 term
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(4)]
    return p, grads


def _ref_sgd(p, grads, lr, momentum, dampening, nesterov, wd, l1):
    p, buf = p.astype(np.float64), None
    for t, g in enumerate(grads):
        d = g + wd * p + l1 * np.sign(p)
        if momentum:
            buf = d.copy() if t == 0 else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def _ref_adam(p, grads, lr, b1, b2, eps, wd, dwd, l1, amsgrad):
    p = p.astype(np.float64)
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g0 = g + wd * p + l1 * np.sign(p)
        p = p * (1 - lr * dwd)
        m = b1 * m + (1 - b1) * g0
        v = b2 * v + (1 - b2) * g0 * g0
        vmax = np.maximum(vmax, v)
        denom = np.sqrt(vmax if amsgrad else v) / np.sqrt(1 - b2**t) + eps
        p = p - lr / (1 - b1**t) * m / denom
    return p


def _ref_rmsprop(p, grads, lr, alpha, eps, wd, l1, momentum, centered):
    p = p.astype(np.float64)
    sq, ga, buf = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        g = g + wd * p + l1 * np.sign(p)
        sq = alpha * sq + (1 - alpha) * g * g
        if centered:
            ga = alpha * ga + (1 - alpha) * g
            avg = np.sqrt(sq - ga * ga) + eps
        else:
            avg = np.sqrt(sq) + eps
        if momentum:
            buf = momentum * buf + g / avg
            p = p - lr * buf
        else:
            p = p - lr * g / avg
    return p


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", [
    dict(momentum=0.0, dampening=0.0, nesterov=False, wd=0.0, l1=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=False, wd=0.0, l1=0.0),  # the branch-free loop
    dict(momentum=0.9, dampening=0.5, nesterov=False, wd=0.0, l1=0.0),
    dict(momentum=0.9, dampening=0.1, nesterov=False, wd=1e-2, l1=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=True, wd=1e-2, l1=1e-3),
])
def test_sgd_update_matches_reference(n, dtype, cfg):
    p, grads = _data(n, dtype)
    ref = _ref_sgd(p, grads, 0.1, **cfg)
    buf = np.zeros_like(p) if cfg["momentum"] else None
    for t, g in enumerate(grads):
        fk.sgd_update(p, g, buf, lr=0.1, momentum=cfg["momentum"], dampening=cfg["dampening"],
                      nesterov=cfg["nesterov"], weight_decay=cfg["wd"], l1=cfg["l1"],
                      first_step=t == 0)
    np.testing.assert_allclose(p, ref, **_tol(dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", [
    dict(wd=0.0, dwd=0.0, l1=0.0, amsgrad=False),
    dict(wd=1e-2, dwd=0.0, l1=1e-3, amsgrad=True),
    dict(wd=0.0, dwd=1e-2, l1=0.0, amsgrad=False),
])
def test_adam_update_matches_reference(n, dtype, cfg):
    p, grads = _data(n, dtype)
    ref = _ref_adam(p, grads, 1e-2, 0.9, 0.999, 1e-8, **cfg)
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        fk.adam_update(p, g, m, v, vmax if cfg["amsgrad"] else None, step=t, lr=1e-2,
                       weight_decay=cfg["wd"], decoupled_weight_decay=cfg["dwd"], l1=cfg["l1"],
                       amsgrad=cfg["amsgrad"])
    np.testing.assert_allclose(p, ref, **_tol(dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", [
    dict(wd=0.0, l1=0.0, momentum=0.0, centered=False),
    dict(wd=1e-2, l1=1e-3, momentum=0.5, centered=True),
])
def test_rmsprop_update_matches_reference(n, dtype, cfg):
    p, grads = _data(n, dtype)
    ref = _ref_rmsprop(p, grads, 1e-2, 0.99, 1e-8, **cfg)
    sq, ga, buf = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        fk.rmsprop_update(p, g, sq, ga if cfg["centered"] else None,
                          buf if cfg["momentum"] else None, lr=1e-2, weight_decay=cfg["wd"],
                          l1=cfg["l1"], momentum=cfg["momentum"], centered=cfg["centered"])
    np.testing.assert_allclose(p, ref, **_tol(dtype))


def test_updates_match_torch_optim():
    torch = pytest.importorskip("torch")
    p0, grads = _data(1000, np.float32, seed=1)
    cases = [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
         lambda p, g, st, t: fk.sgd_update(p, g, st.setdefault("b", np.zeros_like(p)), lr=0.1,
                                           momentum=0.9, nesterov=True, weight_decay=1e-2,
                                           first_step=t == 1)),
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
         lambda p, g, st, t: fk.adam_update(p, g, *[st.setdefault(k, np.zeros_like(p)) for k in "mvx"],
                                            step=t, lr=1e-2, weight_decay=1e-2, amsgrad=True)),
        (torch.optim.AdamW, dict(lr=1e-2),
         lambda p, g, st, t: fk.adam_update(p, g, *[st.setdefault(k, np.zeros_like(p)) for k in "mv"],
                                            step=t, lr=1e-2, decoupled_weight_decay=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-2),
         lambda p, g, st, t: fk.rmsprop_update(p, g, *[st.setdefault(k, np.zeros_like(p)) for k in "sab"],
                                               lr=1e-2, momentum=0.5, centered=True,
                                               weight_decay=1e-2)),
    ]
    for cls, kw, ours in cases:
        p, st = p0.copy(), {}
        tp = torch.tensor(p0.copy(), requires_grad=True)
        opt = cls([tp], **kw)
        for t, g in enumerate(grads, 1):
            ours(p, g, st, t)
            tp.grad = torch.tensor(g)
            opt.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=cls.__name__)


@pytest.mark.parametrize("n", SIZES)
def test_infinite_parameters_without_penalties_stay_infinite(n):
    # as in torch, the penalty terms are not added at all when they are zero (0 * inf is NaN)
    p = np.full(n, np.inf, np.float32)
    p[1::2] = -np.inf
    buf = np.zeros(n, np.float32)
    for t in range(3):
        fk.sgd_update(p, np.ones(n, np.float32), buf, lr=0.1, momentum=0.9, first_step=t == 0)
    fk.adam_update(p, np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32), step=1)
    assert np.isinf(p).all() and (np.sign(p[:4]) == [1, -1, 1, -1]).all()


def test_update_of_a_2d_parameter_is_in_place():
    p = np.ones((3, 4), np.float32)
    out = fk.sgd_update(p, np.full((3, 4), 2, np.float32), lr=0.5)
    assert out is p
    np.testing.assert_array_equal(p, np.zeros((3, 4), np.float32))


def test_bad_arguments_raise_clear_errors():
    p, g = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="grad must match param"):
        fk.sgd_update(p, np.zeros(5, np.float32), lr=0.1)
    with pytest.raises(ValueError, match="grad must match param"):
        fk.sgd_update(p, np.zeros(4, np.float64), lr=0.1)
    with pytest.raises(TypeError, match="param must be"):
        fk.sgd_update(np.zeros(4, np.int32), g, lr=0.1)
    with pytest.raises(ValueError, match="C-contiguous"):
        fk.sgd_update(np.zeros(8, np.float32)[::2], g, lr=0.1)
    with pytest.raises(ValueError, match="momentum_buffer must match"):
        fk.sgd_update(p, g, np.zeros(3, np.float32), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        fk.sgd_update(p, g, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        fk.sgd_update(p, g, np.zeros(4, np.float32), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="step must be"):
        fk.adam_update(p, g, p.copy(), p.copy(), step=0)
    with pytest.raises(ValueError, match="beta1"):
        fk.adam_update(p, g, p.copy(), p.copy(), step=1, beta1=1.0)
    with pytest.raises(TypeError, match="exp_avg must be"):
        fk.adam_update(p, g, None, p.copy(), step=1)
    with pytest.raises(TypeError, match="max_exp_avg_sq must be"):
        fk.adam_update(p, g, p.copy(), p.copy(), step=1, amsgrad=True)
    with pytest.raises(ValueError, match="alpha"):
        fk.rmsprop_update(p, g, p.copy(), alpha=1.5)


# ---------------------------------------------------------------- foreach: many parameters in one call

def _params_of(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


FOREACH_SHAPES = [(6, 1, 5, 5), (6,), (120, 400), (1,), (0,), (PARALLEL_MIN_SIZE + 3,)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_a_foreach_update_is_one_update_per_parameter_bit_for_bit(dtype, kind):
    ps, gs = _params_of(FOREACH_SHAPES, dtype, 0), _params_of(FOREACH_SHAPES, dtype, 1)
    qs = [p.copy() for p in ps]
    n_states = {"sgd": 1, "adam": 3, "rmsprop": 3}[kind]
    s1 = [[np.abs(a) + 1 if j != 1 else a / 10 for a in _params_of(FOREACH_SHAPES, dtype, 2 + j)]
          for j in range(n_states)]
    s2 = [[a.copy() for a in lst] for lst in s1]
    for step in (1, 2):
        if kind == "sgd":
            kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, l1=1e-3, first_step=step == 1)
            fk.sgd_update_foreach(ps, gs, s1[0], **kw)
            for p, g, b in zip(qs, gs, s2[0]):
                fk.sgd_update(p, g, b, **kw)
        elif kind == "adam":
            kw = dict(step=step, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=1e-3, l1=1e-4, amsgrad=True)
            fk.adam_update_foreach(ps, gs, *s1, **kw)
            for p, g, m, v, vm in zip(qs, gs, *s2):
                fk.adam_update(p, g, m, v, vm, **kw)
        else:
            kw = dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-2, l1=1e-4)
            fk.rmsprop_update_foreach(ps, gs, s1[0], s1[1], s1[2], **kw)
            for p, g, sq, ga, b in zip(qs, gs, *s2):
                fk.rmsprop_update(p, g, sq, ga, b, **kw)
    for a, b in zip(ps + sum(s1, []), qs + sum(s2, [])):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


def test_a_foreach_update_matches_the_reference_formula():
    ps, gs = _params_of([(4, 5), (5,)], np.float64, 0), _params_of([(4, 5), (5,)], np.float64, 1)
    want = [_ref_sgd(p.ravel(), [g.ravel()], 0.1, 0.0, 0.0, False, 1e-2, 0.0).reshape(p.shape) for p, g in zip(ps, gs)]
    fk.sgd_update_foreach(ps, gs, lr=0.1, weight_decay=1e-2)
    for p, w in zip(ps, want):
        np.testing.assert_allclose(p, w, rtol=1e-12)


def test_a_foreach_update_checks_everything_before_changing_anything():
    ps = [np.ones(3, np.float32), np.ones(4, np.float32)]
    before = [p.copy() for p in ps]
    good, bad = np.ones(3, np.float32), np.ones(5, np.float32)
    with pytest.raises(ValueError, match=r"params\[1\].*grad must match param"):
        fk.sgd_update_foreach(ps, [good, bad], lr=0.1)
    with pytest.raises(ValueError, match="grads has 1 arrays for 2 params"):
        fk.sgd_update_foreach(ps, [good], lr=0.1)
    with pytest.raises(TypeError, match="momentum_buffers must be a list or tuple"):
        fk.sgd_update_foreach(ps, [good, np.ones(4, np.float32)], np.ones(3, np.float32), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"params\[0\].*momentum_buffer must match"):
        fk.sgd_update_foreach(ps, [good, np.ones(4, np.float32)], [bad, bad], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match=r"params\[1\].*float32 or float64"):
        fk.adam_update_foreach([ps[0], np.ones(4, np.int32)], [good, good], [good, good], [good, good], step=1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        fk.rmsprop_update_foreach(ps, [good, np.ones(4, np.float32)], [good, np.ones(4, np.float32)], lr=-1.0)
    with pytest.raises(TypeError, match="params must be a list or tuple"):
        fk.sgd_update_foreach(ps[0], [good], lr=0.1)
    for p, b in zip(ps, before):
        np.testing.assert_array_equal(p, b)


@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_a_foreach_update_matches_its_numpy_version(kind):
    from fastkern import reference
    shapes = [(16, 6, 5, 5), (16,), (84, 120)]
    ps, gs = _params_of(shapes, np.float64, 0), _params_of(shapes, np.float64, 1)
    qs = [p.copy() for p in ps]
    # state as a run leaves it: square averages well above the squared mean gradient
    s1 = [[np.abs(a) + 1.0 if j != 1 else 0.1 * a for a in _params_of(shapes, np.float64, 2 + j)] for j in range(3)]
    s2 = [[a.copy() for a in lst] for lst in s1]
    for step in (1, 2, 3):
        for mod, p, s in ((fk, ps, s1), (reference, qs, s2)):
            if kind == "sgd":
                mod.sgd_update_foreach(p, gs, s[0], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2,
                                       first_step=step == 1)
            elif kind == "adam":
                mod.adam_update_foreach(p, gs, s[0], s[1], s[2], step=step, lr=1e-2, l1=1e-3, amsgrad=True)
            else:
                mod.rmsprop_update_foreach(p, gs, s[0], s[1], s[2], lr=1e-2, momentum=0.5, centered=True)
    for a, b in zip(ps + sum(s1, []), qs + sum(s2, [])):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

"""models' optimizers and LR schedules: hand-computed steps, torch.optim, state_dict round trips."""
import math

import numpy as np
import pytest

import models


def _params(seed=0, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    return [models.Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def _set_grads(params, t):
    for i, p in enumerate(params):
        p.grad[...] = np.cos(np.arange(p.size) * (i + 1) + t).reshape(p.shape)


def test_sgd_momentum_by_hand():
    (p,) = _params(shapes=((2,),))
    p[...] = [1.0, -2.0]
    opt = models.SGD([p], lr=0.1, momentum=0.5, weight_decay=0.1)
    p.grad[...] = [1.0, 1.0]
    opt.step()  # d = g + 0.1 p = [1.1, 0.8]; buf = d; p -= 0.1 d
    np.testing.assert_allclose(p, [0.89, -2.08], rtol=1e-6)
    opt.step()  # d = [1.089, 0.792]; buf = 0.5 [1.1, 0.8] + d = [1.639, 1.192]
    np.testing.assert_allclose(p, [0.89 - 0.1639, -2.08 - 0.1192], rtol=1e-6)
    opt.zero_grad()
    assert not p.grad.any()


def test_l1_l2_regularization_by_hand():
    (p,) = _params(shapes=((3,),))
    p[...] = [2.0, 0.0, -1.0]
    opt = models.SGD([p], lr=0.5, l1=0.2, l2=0.1)
    opt.step()  # zero grad: d = 0.2 sign(p) + 0.1 p = [0.4, 0, -0.3]
    np.testing.assert_allclose(p, [1.8, 0.0, -0.85], rtol=1e-6)


@pytest.mark.parametrize("name, kw", [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=5e-2)),
    ("RMSprop", dict(lr=1e-2, momentum=0.3, centered=True)),
])
def test_optimizers_match_torch(name, kw):
    torch = pytest.importorskip("torch")
    params = _params()
    tparams = [torch.tensor(p.array.copy(), requires_grad=True) for p in params]
    ours, theirs = getattr(models, name)(params, **kw), getattr(torch.optim, name)(tparams, **kw)
    for t in range(5):
        _set_grads(params, t)
        for p, tp in zip(params, tparams):
            tp.grad = torch.tensor(p.grad.copy())
        ours.step()
        theirs.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda o: models.StepLR(o, step_size=3, gamma=0.5),
    lambda o: models.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
])
def test_schedules_match_closed_forms_and_torch(make):
    (p,) = _params(shapes=((1,),))
    opt = models.SGD([p], lr=0.1)
    sched = make(opt)
    lrs = [opt.lr]
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.lr)
    if isinstance(sched, models.StepLR):
        want = [0.1 * 0.5 ** (e // 3) for e in range(11)]
    else:
        want = [0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(11)]
    np.testing.assert_allclose(lrs, want, rtol=1e-9, atol=1e-12)
    torch = pytest.importorskip("torch")
    tp = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1)
    tsched = (torch.optim.lr_scheduler.StepLR(topt, 3, 0.5) if isinstance(sched, models.StepLR)
              else torch.optim.lr_scheduler.CosineAnnealingLR(topt, 4, 0.01))
    tlrs = [topt.param_groups[0]["lr"]]
    for _ in range(10):
        topt.step()
        tsched.step()
        tlrs.append(topt.param_groups[0]["lr"])
    np.testing.assert_allclose(lrs, tlrs, rtol=1e-12)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_state_dict_round_trip_continues_identically(name):
    kw = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=1e-2),
          "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True)}[name]
    a, b = _params(), _params()
    opt_a = getattr(models, name)(a, **kw)
    for t in range(3):
        _set_grads(a, t)
        opt_a.step()
    for p, q in zip(a, b):
        q[...] = p
    opt_b = getattr(models, name)(b, lr=1.0)
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.lr == opt_a.lr and opt_b.hyper == opt_a.hyper
    for t in range(3, 5):
        _set_grads(a, t)
        _set_grads(b, t)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def test_optimizer_argument_errors():
    params = _params()
    with pytest.raises(ValueError, match="lr"):
        models.SGD(params, lr=0.0)
    with pytest.raises(ValueError, match="nesterov"):
        models.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        models.Adam(params, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="models.Parameter"):
        models.SGD([np.zeros(3, np.float32)], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        models.SGD([params[0], params[0]], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        models.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="state_dict is for"):
        models.Adam(params).load_state_dict(models.SGD(params, lr=0.1).state_dict())


def test_parameters_at_different_step_counts_each_get_their_own_update():
    # a state_dict can hold different step counts: each group of parameters is updated with its own
    a, b = models.Parameter(np.ones(3, np.float32)), models.Parameter(np.ones(2, np.float32))
    opt = models.SGD([a, b], lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    sd["state"][1] = {"step": 1, "momentum_buffer": np.full(2, 5.0, np.float32)}
    opt.load_state_dict(sd)
    a.grad, b.grad = np.full(3, 2.0, np.float32), np.full(2, 2.0, np.float32)
    opt.step()
    np.testing.assert_allclose(a.array, 1 - 0.1 * 2.0)  # first step: buf = grad
    np.testing.assert_allclose(b.array, 1 - 0.1 * (0.9 * 5.0 + 2.0), rtol=1e-6)  # buf = 0.9 buf + grad
    assert [s["step"] for s in opt.state] == [1, 2]

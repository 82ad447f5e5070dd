"""Modules and layers: whole-model float64 gradient checks against finite differences,
the torch twins of the zoo models, and the Module API (names, state_dict, modes, init)."""
import math

import numpy as np
import pytest

import models
from fastkern.testing import gradcheck


def _model_gradcheck(model, crit, x, target, eps=1e-6, atol=1e-6, rtol=1e-5):
    """Finite differences of loss(model(x)) w.r.t. the input and every parameter, in float64."""
    params = list(model.parameters())

    def f(x_, *ps):
        for p, v in zip(params, ps):
            p[...] = v
        return np.asarray(crit(model(x_), target))

    def backward(g, x_, *ps):
        f(x_, *ps)
        model.zero_grad()
        gx = model.backward(crit.backward(float(g)))
        return (gx, *[p.grad.copy() for p in params])

    gradcheck(f, [x] + [p.array.copy() for p in params], backward, eps=eps, atol=atol, rtol=rtol)


def test_lenet_like_model_gradients_match_finite_differences():
    models.manual_seed(0)
    model = models.Sequential(
        models.Conv2d(1, 2, 3, padding=1), models.ReLU(), models.MaxPool2d(2),
        models.Conv2d(2, 3, 3, padding=1, activation="relu"), models.MaxPool2d(2, stride=1),
        models.Flatten(), models.Linear(27, 6), models.ReLU(inplace=True), models.Linear(6, 4),
    ).to(np.float64)
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8))
    _model_gradcheck(model, models.CrossEntropyLoss(), x, np.array([1, 3]))


def test_conv_then_max_pool_pairs_run_as_one_op_with_the_same_results(monkeypatch):
    # Sequential runs a Conv2d -> MaxPool2d(2) pair as one conv (max_pool=2, then pool_indices):
    # finite differences, and the module-by-module forward and backward, agree with it
    models.manual_seed(3)
    model = models.Sequential(
        models.Conv2d(2, 3, 3, padding=1, activation="relu"), models.MaxPool2d(2),
        models.Conv2d(3, 4, 3, padding=1), models.MaxPool2d(2, stride=2),
        models.Conv2d(4, 2, 2), models.MaxPool2d(2, stride=1),  # stride 1: runs on its own
        models.Flatten(), models.Linear(4, 3),
    ).to(np.float64)
    x = np.random.default_rng(5).standard_normal((2, 2, 14, 18))  # odd pooled sizes: 7 x 9, then 3 x 4
    target = np.array([0, 2])
    _model_gradcheck(model, models.CrossEntropyLoss(), x, target)

    import fastkern
    pool_forward, pool_backward = fastkern.max_pool2d, fastkern.max_pool2d_backward
    calls = []
    monkeypatch.setattr(fastkern, "max_pool2d", lambda *a, **k: calls.append("f") or pool_forward(*a, **k))
    monkeypatch.setattr(fastkern, "max_pool2d_backward", lambda *a, **k: calls.append("b") or pool_backward(*a, **k))
    h = x
    for m in model:  # module by module: no pair runs fused
        h = m(h)
    crit = models.CrossEntropyLoss()
    np.testing.assert_allclose(model(x), h, rtol=1e-12, atol=1e-12)
    calls.clear()
    crit(model(x), target)
    model.zero_grad()
    gx = model.backward(crit.backward())
    fused = [p.grad.copy() for p in model.parameters()]
    assert calls == ["f", "b"]  # only the stride-1 pool runs on its own
    crit(model(x), target)
    model.zero_grad()
    g = crit.backward()
    for m in reversed(list(model)):  # after the fused forward: the pools' own backward, then the convs'
        g = m.backward(g)
    np.testing.assert_allclose(gx, g, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused, (p.grad for p in model.parameters())):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_other_layers_gradients_match_finite_differences():
    models.manual_seed(1)
    model = models.Sequential(
        models.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=False),
        models.BatchNorm2d(4), models.LeakyReLU(0.1),
        models.Conv2d(4, 4, 2, dilation=2, activation="relu"),
        models.AvgPool2d(2, stride=1, padding=1, count_include_pad=False), models.Tanh(),
        models.GlobalAvgPool2d(), models.Dropout(0.3), models.Linear(4, 3), models.Sigmoid(),
    ).to(np.float64)
    x = np.random.default_rng(2).standard_normal((3, 2, 9, 9))
    drop, dropout_forward = model[7], model[7].forward

    def same_mask_every_time(x_):
        drop.generator = np.random.default_rng(5)
        return dropout_forward(x_)

    drop.forward = same_mask_every_time
    _model_gradcheck(model, models.MSELoss(), x, np.full((3, 3), 0.25))


def test_conv1d_batchnorm1d_bce_gradients_match_finite_differences():
    models.manual_seed(2)
    model = models.Sequential(models.Conv1d(2, 3, 3, padding=2, dilation=2), models.BatchNorm1d(3),
                              models.ReLU(), models.Flatten(), models.Linear(18, 2)).to(np.float64)
    x = np.random.default_rng(3).standard_normal((4, 2, 6))
    target = (np.random.default_rng(4).random((4, 2)) > 0.5).astype(np.float64)
    _model_gradcheck(model, models.BCEWithLogitsLoss(), x, target)
    model.eval()  # batch norm with the running statistics
    _model_gradcheck(model, models.BCEWithLogitsLoss(), x, target)


def test_backward_accumulates_gradients_until_zero_grad():
    model = models.MLP(5, (4,), 3, dtype=np.float64)
    x, y = np.random.default_rng(0).standard_normal((2, 5)), np.array([0, 2])
    crit = models.CrossEntropyLoss()
    crit(model(x), y)
    model.backward(crit.backward())
    once = [p.grad.copy() for p in model.parameters()]
    crit(model(x), y)
    model.backward(crit.backward())
    for g, p in zip(once, model.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g)
    model.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())


def test_zero_grad_defers_the_fill_and_the_next_gradient_is_adopted_then_added():
    p = models.Parameter(np.zeros((2, 3)))
    p.grad[...] = 5.0
    p.zero_grad()
    g = np.ones((2, 3))
    p.accumulate_grad(g)
    assert p.grad is g  # adopted, not added to a zero-filled array
    p.accumulate_grad(np.full((2, 3), 2.0))
    np.testing.assert_array_equal(p.grad, np.full((2, 3), 3.0))
    p.zero_grad()
    np.testing.assert_array_equal(p.grad, np.zeros((2, 3)))  # reading fills the zeros
    p.zero_grad()
    strided = np.ones((3, 2)).T  # not C-contiguous: copied into .grad, never adopted
    p.accumulate_grad(strided)
    assert p.grad is not strided and p.grad.flags.c_contiguous
    np.testing.assert_array_equal(p.grad, np.ones((2, 3)))
    p.zero_grad()
    p.accumulate_grad(np.ones((2, 3), np.float32))  # another dtype: added, in the parameter's dtype
    assert p.grad.dtype == np.float64 and p.grad.sum() == 6.0
    with pytest.raises(ValueError, match=r"shape \(3,\) for a parameter of shape \(2, 3\)"):
        p.accumulate_grad(np.ones(3))  # would broadcast silently


@pytest.mark.parametrize("name, shape", [("LeNet5", (4, 1, 28, 28)), ("SmallCNN", (2, 3, 32, 32))])
def test_zoo_models_match_their_torch_twins(name, shape):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    twins = {
        "LeNet5": lambda: nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)),
        "SmallCNN": lambda: nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 10)),
    }
    ours, twin = getattr(models, name)(), twins[name]().double()
    ours_sd, twin_sd = ours.state_dict(), twin.state_dict()
    assert [v.shape for v in ours_sd.values()] == [tuple(v.shape) for v in twin_sd.values()]
    twin.load_state_dict({k: torch.tensor(v, dtype=torch.float64)
                          for k, v in zip(twin_sd, ours_sd.values())})  # the same order
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = np.arange(shape[0]) % 10
    crit = models.CrossEntropyLoss()
    loss = crit(ours(x), y)
    gx = ours.backward(crit.backward())
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tloss = nn.functional.cross_entropy(twin(tx), torch.tensor(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-4)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-3, atol=1e-5)
    for (n, p), tp in zip(ours.named_parameters(), twin.parameters()):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=n)


def test_names_state_dict_round_trip_and_modes():
    model = models.Sequential(models.Conv2d(1, 2, 3), models.BatchNorm2d(2),
                              models.Sequential(models.Flatten(), models.Linear(8, 3)))
    names = list(model.state_dict())
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.1.weight", "2.1.bias",
                     "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert [n for n, _ in model.named_parameters()] == names[:6]
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    model(x)
    assert int(model[1].num_batches_tracked) == 1 and model[1].running_mean.any()
    other = models.Sequential(models.Conv2d(1, 2, 3, seed=9), models.BatchNorm2d(2),
                              models.Sequential(models.Flatten(), models.Linear(8, 3, seed=9)))
    other.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
    model.eval(), other.eval()
    assert not model.training and not model[2][1].training
    np.testing.assert_array_equal(model(x), other(x))
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"0.weight": model[0].weight.array})
    with pytest.raises(ValueError, match="0.bias: shape"):
        other.load_state_dict({**model.state_dict(), "0.bias": np.zeros(3, np.float32)})


def test_parameter_behaves_like_an_array_with_a_grad():
    p = models.Parameter(np.arange(4, dtype=np.float32))
    assert p.grad.shape == (4,) and not p.grad.any() and p.grad.dtype == np.float32
    assert type(p * 2) is np.ndarray and type(p.array) is np.ndarray
    assert np.shares_memory(p, p.array) and isinstance(float(p.sum()), float)
    with pytest.raises(TypeError, match="float32 or float64"):
        models.Parameter(np.arange(3))


def test_default_and_named_initializations():
    a, b = models.Linear(300, 200, seed=3), models.Linear(300, 200, seed=3)
    np.testing.assert_array_equal(a.weight, b.weight)
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) and the bias rule both give this
    assert np.abs(a.weight).max() <= bound and np.abs(a.weight).max() > 0.95 * bound
    assert np.abs(a.bias).max() <= bound
    w = np.empty((400, 300), np.float64)
    rng = np.random.default_rng(0)
    models.init.kaiming_normal_(w, nonlinearity="relu", rng=rng)
    assert w.std() == pytest.approx(math.sqrt(2 / 300), rel=0.02)
    models.init.xavier_uniform_(w, rng=rng)
    assert np.abs(w).max() <= math.sqrt(6 / 700) and w.std() == pytest.approx(
        math.sqrt(2 / 700), rel=0.02)
    conv = models.Conv2d(4, 8, 3, groups=2, seed=0)
    assert np.abs(conv.weight).max() <= 1 / math.sqrt(2 * 9)
    models.manual_seed(7)
    c1 = models.LeNet5(seed=None)
    models.manual_seed(7)
    c2 = models.LeNet5(seed=None)
    np.testing.assert_array_equal(c1[0].weight, c2[0].weight)
    assert not np.array_equal(models.LeNet5(seed=1)[0].weight, models.LeNet5(seed=2)[0].weight)


def test_lenet5_without_input_grad_gives_the_same_parameter_gradients():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    g = rng.standard_normal((4, 10)).astype(np.float32)
    full, lean = models.LeNet5(seed=5), models.LeNet5(seed=5, input_grad=False)
    full(x), lean(x)
    assert full.backward(g).shape == x.shape
    assert lean.backward(g) is None
    for (name, p), (_, q) in zip(full.named_parameters(), lean.named_parameters()):
        np.testing.assert_allclose(q.grad, p.grad, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("args", [dict(padding="same"), dict(padding="valid", dilation=2), dict(stride=2, padding=1),
                                  dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2))])
def test_conv2d_output_shape_is_the_forwards(args):
    # what the pool after a fused conv reports as its input shape (for a module-by-module backward)
    conv = models.Conv2d(2, 3, (3, 2), **args)
    x = np.zeros((2, 2, 9, 8), np.float32)
    assert conv._output_shape(x.shape) == conv(x).shape

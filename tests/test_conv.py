"""Convolutions and im2col/col2im against a naive NumPy reference, finite differences and torch."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkern
from fastkern import conv as conv_mod
from fastkern.testing import gradcheck

FWD = {1: fastkern.conv1d, 2: fastkern.conv2d, 3: fastkern.conv3d}
BWD = {1: fastkern.conv1d_backward, 2: fastkern.conv2d_backward, 3: fastkern.conv3d_backward}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Independent reference: explicit zero padding, one strided window per kernel tap


def _pads(padding, kernel, dilation, nd):
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [(t // 2, t - t // 2) for t in tot]
    p = (padding,) * nd if isinstance(padding, int) else padding
    return [(q, q) for q in p]


def naive_conv(x, w, b, stride, padding, dilation, groups):
    nd = x.ndim - 2
    kernel = w.shape[2:]
    stride = (stride,) * nd if isinstance(stride, int) else stride
    dilation = (dilation,) * nd if isinstance(dilation, int) else dilation
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + _pads(padding, kernel, dilation, nd))
    out = [(xp.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    n, c = x.shape[:2]
    co, cg = w.shape[:2]
    mg = co // groups
    y = np.zeros((n, co, *out))
    for tap in np.ndindex(*kernel):
        sl = tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out)
        )
        win = xp[(slice(None), slice(None)) + sl]  # (N, C, *out)
        for g in range(groups):
            wt = w[(slice(g * mg, (g + 1) * mg), slice(None)) + tap].astype(np.float64)  # (mg, cg)
            y[:, g * mg:(g + 1) * mg] += np.tensordot(wt, win[:, g * cg:(g + 1) * cg], axes=([1], [1])).swapaxes(0, 1)
    if b is not None:
        y += b.reshape((1, co) + (1,) * nd)
    return y


# ---------------------------------------------------------------------------
# Random cases


@st.composite
def conv_cases(draw, nd=None, max_batch=4):
    nd = draw(st.integers(1, 3)) if nd is None else nd
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 3))
    depthwise = draw(st.booleans()) and groups > 1
    mg = 1 if depthwise else draw(st.integers(1, 3))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    kernel = tuple(draw(st.integers(1, 3 if nd == 3 else 4)) for _ in range(nd))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding == "same":
        stride = (1,) * nd
    elif padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    max_size = {1: 12, 2: 9, 3: 6}[nd]
    size = tuple(
        draw(st.integers(d * (k - 1) + 1, max(d * (k - 1) + 1, max_size))) for k, d in zip(kernel, dilation)
    )
    n = draw(st.integers(1, max_batch))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(nd=nd, n=n, c=cg * groups, size=size, co=mg * groups, kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups, dtype=dtype, bias=bias, seed=seed)


def make_arrays(case):
    rng = np.random.default_rng(case["seed"])
    dt = case["dtype"]
    x = rng.standard_normal((case["n"], case["c"]) + case["size"]).astype(dt)
    w = rng.standard_normal((case["co"], case["c"] // case["groups"]) + case["kernel"]).astype(dt)
    b = rng.standard_normal(case["co"]).astype(dt) if case["bias"] else None
    return x, w, b


def conv_args(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Forward against the naive reference; backward against the adjoint identity


@settings(max_examples=40, **SETTINGS)
@given(conv_cases())
def test_forward_matches_naive_reference(case):
    x, w, b = make_arrays(case)
    y = FWD[case["nd"]](x, w, b, **conv_args(case))
    ref = naive_conv(x, w, b, **conv_args(case))
    assert y.dtype == x.dtype and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, **tol(case["dtype"]))


@settings(max_examples=30, **SETTINGS)
@given(conv_cases())
def test_backward_is_the_adjoint_of_forward(case):
    # <dy, conv(x, w)> is bilinear in x and w: its gradients are exact inner-product identities,
    # checked here on random shapes (finite differences below use fixed small ones).
    x, w, b = make_arrays(case)
    args = conv_args(case)
    y = naive_conv(x, w, None, **args)
    gy = np.random.default_rng(case["seed"] + 1).standard_normal(y.shape).astype(case["dtype"])
    dx, dw, db = BWD[case["nd"]](gy, x, w, **args)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (w.shape[0],)
    rng = np.random.default_rng(case["seed"] + 2)
    u = rng.standard_normal(x.shape)
    v = rng.standard_normal(w.shape)
    lhs_x = np.sum(gy * naive_conv(u, w, None, **args))
    lhs_w = np.sum(gy * naive_conv(x, v, None, **args))
    scale = np.sqrt(gy.size * max(1, w[0].size)) * 10
    t = 1e-4 if case["dtype"] == np.float32 else 1e-10
    assert abs(np.sum(dx * u) - lhs_x) <= t * scale * (1 + np.abs(gy).max())
    assert abs(np.sum(dw * v) - lhs_w) <= t * scale * (1 + np.abs(gy).max()) * (1 + np.abs(x).max())
    np.testing.assert_allclose(db, gy.reshape(gy.shape[0], gy.shape[1], -1).sum(axis=(0, 2)), **tol(case["dtype"]))


GRAD_CASES = [
    dict(nd=1, n=2, c=2, size=(7,), co=3, kernel=(3,), stride=(2,), padding=1, dilation=(1,), groups=1),
    dict(nd=1, n=1, c=4, size=(6,), co=4, kernel=(2,), stride=(1,), padding="same", dilation=(2,), groups=4),
    dict(nd=2, n=2, c=2, size=(5, 4), co=3, kernel=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 1), groups=1),
    dict(nd=2, n=1, c=4, size=(5, 5), co=2, kernel=(2, 2), stride=(1, 1), padding="same", dilation=(2, 1), groups=2),
    dict(nd=3, n=1, c=2, size=(3, 4, 3), co=2, kernel=(2, 2, 2), stride=(1, 2, 1), padding=1, dilation=(1, 1, 1), groups=2),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c['nd']}d-g{c['groups']}-{c['padding']}")
def test_backward_matches_finite_differences(case):
    case = dict(case, dtype=np.float64, bias=True, seed=3)
    x, w, b = make_arrays(case)
    args = conv_args(case)
    nd = case["nd"]

    def f(x, w, b):
        return FWD[nd](x, w, b, **args)

    def backward(gy, x, w, b):
        return BWD[nd](gy, x, w, **args)

    assert gradcheck(f, [x, w, b], backward, atol=1e-6, rtol=1e-5)


def test_backward_without_bias_grad_returns_none():
    x = np.ones((1, 2, 5, 5))
    w = np.ones((3, 2, 3, 3))
    dx, dw, db = fastkern.conv2d_backward(np.ones((1, 3, 3, 3)), x, w, bias_grad=False)
    assert db is None and dx.shape == x.shape and dw.shape == w.shape


def test_bands_and_single_sample_split_agree_with_reference(monkeypatch):
    # A tiny per-thread budget forces bands of one output row (split over threads for one sample).
    monkeypatch.setattr(conv_mod, "_THREAD_BYTES", 256)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 9, 11))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    args = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    y = fastkern.conv2d(x, w, b, **args)
    np.testing.assert_allclose(y, naive_conv(x, w, b, **args), rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    dx, dw, db = fastkern.conv2d_backward(gy, x, w, **args)
    monkeypatch.setattr(conv_mod, "_THREAD_BYTES", 1 << 20)
    dx2, dw2, db2 = fastkern.conv2d_backward(gy, x, w, **args)
    np.testing.assert_allclose(dx, dx2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, db2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("thread_bytes, band_rows", [(2048, 1), (24576, 2)])  # 9 rows: 9 x 1, 4 x 2 + 1
def test_bands_over_several_samples_per_thread_through_relu_match_reference(thread_bytes, band_rows, monkeypatch):
    # Bands of a few output rows and a shorter last one, several samples per thread, grad_y
    # masked by a ReLU that differs per sample, scratch left full of NaN: every band must
    # write its own positions and zeros, whatever an earlier sample or band left there.
    monkeypatch.setattr(conv_mod, "_THREAD_BYTES", thread_bytes)
    monkeypatch.setattr(conv_mod, "_FORCE", "wide")
    rng = np.random.default_rng(21)
    x = rng.standard_normal((5, 3, 9, 10))
    w = rng.standard_normal((4, 3, 3, 3))
    y = np.maximum(naive_conv(x, w, None, 1, 1, 1, 1), 0)
    gy = rng.standard_normal(y.shape)
    conv_mod.clear_workspaces()
    conv_mod._workspace("backward", np.float64, fastkern.get_num_threads(), 1 << 12)[:] = np.nan
    dx, dw, db = fastkern.conv2d_backward(gy, x, w, padding=1, activation="relu", output=y)
    plan = list(conv_mod._CALLS.values())[-1].plan
    assert plan.mode == conv_mod.WIDE and plan.rt == band_rows and plan.n_bands == -(-plan.rows // band_rows)
    g = np.where(y > 0, gy, 0)
    np.testing.assert_allclose(dx, naive_conv_grad_x(g, w, x.shape, 1, 1, 1, 1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, naive_conv_grad_w(g, x, w, 1, padding=1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, g.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stage_vectors", [8, 16, 24, 1 << 20])  # stages of 1, 2, 3, 6 samples
def test_weight_gradient_over_staged_samples_matches_reference(stage_vectors, monkeypatch):
    # A narrow layer on the wide grid: its inner-product tiles reduce over several staged samples
    # at once, also over a last group of fewer samples (11 samples split 5 + 6 over two threads).
    monkeypatch.setattr(conv_mod, "_STAGE_VECTORS", stage_vectors)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((11, 3, 9, 8))
    w = rng.standard_normal((5, 3, 3, 3))
    gy = rng.standard_normal((11, 5, 7, 6))
    with fastkern.threads(2):
        plan = conv_mod._Call(2, x, w, None, 1, 0, 1, 1, "conv2d_backward", True).plan
        dx, dw, db = fastkern.conv2d_backward(gy, x, w)
    assert plan.mode == conv_mod.WIDE and plan.n_bands == 1
    assert plan.stage == min(max(1, stage_vectors // (plan.ld * 8 // 64)), 6)
    np.testing.assert_allclose(dw, naive_conv_grad_w(gy, x, w, 1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, gy.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(conv_mod, "_STAGE_VECTORS", 1)
    dx1, _, _ = fastkern.conv2d_backward(gy, x, w)
    np.testing.assert_allclose(dx, dx1, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs_and_deterministic_results():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 8, 9)).astype(np.float32)[:, ::2, :, ::-1]
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32).transpose(0, 1, 3, 2)
    y = fastkern.conv2d(x, w, padding=1)
    np.testing.assert_allclose(y, naive_conv(x, w, None, 1, 1, 1, 1), rtol=1e-4, atol=1e-4)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    first = fastkern.conv2d_backward(gy, x, w, padding=1)
    second = fastkern.conv2d_backward(gy, x, w, padding=1)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("stride", [1, 2], ids=["wide-grid", "columns"])
def test_workspace_is_reused_and_bounded(stride):
    x = np.ones((4, 3, 10, 10), np.float32)
    w = np.ones((5, 3, 3, 3), np.float32)

    def step():
        y = fastkern.conv2d(x, w, stride=stride)
        fastkern.conv2d_backward(np.ones_like(y), x, w, stride=stride)

    step()
    before = dict(conv_mod._workspaces)
    step()
    step()
    assert before and all(conv_mod._workspaces[k] is v for k, v in before.items())
    assert 0 < conv_mod.workspace_bytes() <= conv_mod._MAX_WORKSPACE_BYTES
    assert conv_mod.peak_workspace_bytes() >= conv_mod.workspace_bytes()
    expected = fastkern.conv2d(x, w, stride=stride)
    conv_mod.clear_workspaces()
    assert conv_mod.workspace_bytes() == 0
    np.testing.assert_array_equal(fastkern.conv2d(x, w, stride=stride), expected)  # re-created
    assert conv_mod.workspace_bytes() > 0


SOURCE_CASES = [
    # (x shape, weight shape, stride, padding, dilation, groups): LeNet-like, 'same' with an even
    # kernel (asymmetric padding), dilation and groups, 1-D, a ragged last tile, depthwise, 3-D,
    # strided windows that leave input unread
    ((3, 1, 12, 12), (6, 1, 5, 5), 1, 2, 1, 1),
    ((2, 6, 7, 9), (5, 6, 4, 4), 1, "same", 1, 1),
    ((2, 4, 9, 8), (6, 2, 3, 2), 1, (1, 0), (2, 3), 2),
    ((3, 5, 30), (9, 5, 3), 1, 1, 1, 1),
    ((2, 3, 6, 33), (17, 3, 3, 3), 1, 1, 1, 1),
    ((2, 3, 5, 13), (20, 3, 3, 3), 1, 1, 1, 1),  # grad_y panels: whole lane blocks and ragged edges
    ((2, 4, 6, 6), (4, 1, 3, 3), 1, 1, 1, 4),
    ((2, 2, 4, 5, 4), (4, 1, 2, 3, 2), 1, 1, (1, 1, 2), 2),
    ((2, 3, 10, 9), (5, 3, 3, 3), (2, 3), 0, 1, 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("source", ["wide", "columns", "direct"])
@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}")
def test_every_column_source_and_weight_tile_matches_reference(case, source, dtype, monkeypatch):
    # Each way of reading the columns (wide grid, columns gathered from the padded grid or
    # straight from the input), banded or whole, and both weight-gradient tiles
    # (inner-product and NR-wide), against the naive reference and the adjoint identity.
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    nd = x.ndim - 2
    monkeypatch.setattr(conv_mod, "_FORCE", source)
    ref = naive_conv(x, w, b, **args)
    gy = rng.standard_normal(ref.shape).astype(dtype)
    u, v = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    lhs_x = np.sum(gy * naive_conv(u, w, None, **args))
    lhs_w = np.sum(gy * naive_conv(x, v, None, **args))
    t = 1e-3 if dtype == np.float32 else 1e-9
    results = []
    for thread_bytes, dot_bytes in ((1 << 20, 1 << 30), (256, 0)):
        monkeypatch.setattr(conv_mod, "_THREAD_BYTES", thread_bytes)
        monkeypatch.setattr(conv_mod, "_DOT_PARTIAL_BYTES", dot_bytes)
        np.testing.assert_allclose(FWD[nd](x, w, b, **args), ref, **tol(dtype))
        dx, dw, db = BWD[nd](gy, x, w, **args)
        assert abs(np.sum(dx * u) - lhs_x) <= t * (1 + abs(lhs_x))
        assert abs(np.sum(dw * v) - lhs_w) <= t * (1 + abs(lhs_w))
        np.testing.assert_allclose(db, gy.reshape(gy.shape[0], gy.shape[1], -1).sum(axis=(0, 2)), **tol(dtype))
        results.append((dx, dw))
    for a, c in zip(*results):
        np.testing.assert_allclose(a, c, **tol(dtype))


class _GarbageEmpty:
    """numpy, except that ``empty`` returns NaN-filled arrays (recycled memory at its worst)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype)


@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}")
def test_outputs_do_not_depend_on_uninitialized_memory(case, monkeypatch):
    # grad_x starts uninitialized only where the kernel writes all of it; strided windows
    # that stop short of the input's end must still give zeros there, not garbage.
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    nd = x.ndim - 2
    y = FWD[nd](x, w, None, **args)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    want = BWD[nd](gy, x, w, **args)
    monkeypatch.setattr(conv_mod, "np", _GarbageEmpty())
    np.testing.assert_array_equal(FWD[nd](x, w, None, **args), y)
    for got, ref in zip(BWD[nd](gy, x, w, **args), want):
        np.testing.assert_array_equal(got, ref)


def test_cached_call_plans_still_reject_bad_arguments():
    x = np.ones((2, 3, 8, 8), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    y = fastkern.conv2d(x, w, stride=1)
    fastkern.conv2d_backward(y, x, w, stride=1)
    with pytest.raises(TypeError, match="stride"):
        fastkern.conv2d(x, w, stride=True)
    with pytest.raises(ValueError, match="grad_y"):
        fastkern.conv2d_backward(y[:, :, :-1], x, w, stride=1)
    with pytest.raises(TypeError, match="dtype"):
        fastkern.conv2d(x.astype(np.float64), w, stride=1)
    np.testing.assert_allclose(fastkern.conv2d(x, w, stride=np.int64(1)), y)


def test_backward_ignores_non_finite_values_left_in_the_workspace():
    # A NaN input leaves NaNs in the cached scratch; the next call must not pick them up
    # from the padding columns its tiles read past a band.
    x = np.ones((2, 3, 9, 9), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    for source in ("columns", "direct"):
        conv_mod._FORCE = source
        try:
            bad = x.copy()
            bad[0, 0, 0, 0] = np.nan
            gy = np.ones((2, 4, 4, 4), np.float32)
            fastkern.conv2d_backward(gy, bad, w, stride=2)
            dx, dw, db = fastkern.conv2d_backward(gy, x, w, stride=2)
        finally:
            conv_mod._FORCE = None
        assert np.isfinite(dx).all() and np.isfinite(dw).all()
        np.testing.assert_allclose(dw, naive_conv_grad_w(gy, x, w, 2), rtol=1e-5)


def naive_conv_grad_w(gy, x, w, stride, padding=0, dilation=1, groups=1):
    # dW[o, c, tap] = sum over n and outputs of gy[n, o] * (tap's window of the padded x)[n, c]
    nd = x.ndim - 2
    kernel = w.shape[2:]
    stride = (stride,) * nd if isinstance(stride, int) else stride
    dilation = (dilation,) * nd if isinstance(dilation, int) else dilation
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + _pads(padding, kernel, dilation, nd))
    out = gy.shape[2:]
    co, cg = w.shape[:2]
    mg = co // groups
    dw = np.zeros(w.shape)
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out))
        win = xp[(slice(None), slice(None)) + sl]
        for g in range(groups):
            dw[(slice(g * mg, (g + 1) * mg), slice(None)) + tap] = np.tensordot(
                gy[:, g * mg:(g + 1) * mg], win[:, g * cg:(g + 1) * cg], axes=([0] + list(range(2, nd + 2)),) * 2)
    return dw


# ---------------------------------------------------------------------------
# torch as an oracle (forward and autograd)


@settings(max_examples=25, **SETTINGS)
@given(conv_cases())
def test_forward_and_gradients_match_torch(case):
    torch = pytest.importorskip("torch")
    x, w, b = make_arrays(case)
    args = conv_args(case)
    nd = case["nd"]
    tf = getattr(torch.nn.functional, f"conv{nd}d")
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True) if b is not None else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes its own zero-padded copy for even 'same' kernels
        yt = tf(xt, wt, bt, **args)
    y = FWD[nd](x, w, b, **args)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol(case["dtype"]))
    gy = np.random.default_rng(case["seed"]).standard_normal(y.shape).astype(case["dtype"])
    yt.backward(torch.tensor(gy))
    dx, dw, db = BWD[nd](gy, x, w, **args, bias_grad=b is not None)
    t = dict(rtol=1e-3, atol=1e-3) if case["dtype"] == np.float32 else tol(np.float64)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **t)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **t)
    if b is not None:
        np.testing.assert_allclose(db, bt.grad.numpy(), **t)
    else:
        assert db is None


def test_im2col_and_col2im_match_torch_unfold_and_fold():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 7, 8))
    args = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    cols = fastkern.im2col(x, **args)
    ref = torch.nn.functional.unfold(torch.tensor(x), **args).numpy()
    np.testing.assert_array_equal(cols, ref)
    c = rng.standard_normal(cols.shape)
    back = fastkern.col2im(c, (7, 8), **args)
    np.testing.assert_allclose(back, torch.nn.functional.fold(torch.tensor(c), (7, 8), **args).numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------
# im2col / col2im properties


@settings(max_examples=30, **SETTINGS)
@given(conv_cases())
def test_col2im_is_the_adjoint_of_im2col(case):
    x, _, _ = make_arrays(case)
    if isinstance(case["padding"], str):
        case = dict(case, padding=0)
    args = dict(kernel_size=case["kernel"], stride=case["stride"], padding=case["padding"],
                dilation=case["dilation"])
    cols = fastkern.im2col(x, **args)
    c = np.random.default_rng(case["seed"]).standard_normal(cols.shape).astype(x.dtype)
    back = fastkern.col2im(c, x.shape[2:], **args)
    assert back.shape == x.shape and back.dtype == x.dtype
    lhs, rhs = np.vdot(cols.astype(np.float64), c), np.vdot(x.astype(np.float64), back)
    assert abs(lhs - rhs) <= (1e-3 if x.dtype == np.float32 else 1e-9) * (1 + abs(lhs)) * np.sqrt(cols.size)


def test_im2col_columns_are_the_kernel_windows():
    # Each column, reshaped (C, *kernel), is the zero-padded input window at that output position.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4, 5, 6))
    k, s, p, d = (2, 3, 2), (1, 2, 2), (1, 0, 1), (2, 1, 1)
    cols = fastkern.im2col(x, k, s, p, d)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in p])
    out = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    assert cols.shape == (2, 3 * 12, int(np.prod(out)))
    for j, o in enumerate(np.ndindex(*out)):
        sl = tuple(slice(o[i] * s[i], o[i] * s[i] + d[i] * (k[i] - 1) + 1, d[i]) for i in range(3))
        np.testing.assert_array_equal(cols[:, :, j], xp[(slice(None), slice(None)) + sl].reshape(2, -1))


def test_col2im_counts_overlaps():
    # Folding all-ones columns counts how many windows cover each pixel.
    cols = fastkern.im2col(np.ones((1, 1, 5)), 3, padding=1)
    np.testing.assert_array_equal(fastkern.col2im(np.ones_like(cols), 5, 3, padding=1)[0, 0], [2, 3, 3, 3, 2])


# ---------------------------------------------------------------------------
# Bad input


def _x(*shape, dt=np.float32):
    return np.zeros(shape, dt)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: fastkern.conv2d(_x(2, 3, 5), _x(4, 3, 3, 3)), ValueError, ["x", "4-D", "(2, 3, 5)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3)), ValueError, ["weight", "(4, 3, 3)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 2, 3, 3)), ValueError, ["3 channels", "(4, 2, 3, 3)"]),
        (lambda: fastkern.conv2d(_x(1, 4, 5, 5), _x(3, 2, 3, 3), groups=2), ValueError, ["3", "groups=2"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(3, 3, 3, 3), groups=0), ValueError, ["groups", "0"]),
        (lambda: fastkern.conv2d(_x(1, 3, 2, 5), _x(4, 3, 3, 3)), ValueError, ["(3, 3)", "(2, 5)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), dilation=3), ValueError, ["(7, 7)", "larger"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), stride=0), ValueError, ["stride", "(0, 0)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), stride=(1, -2)), ValueError, ["stride", "-2"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), dilation=(0, 1)), ValueError, ["dilation", "(0, 1)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), padding=-1), ValueError, ["padding", "-1"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), padding=(1, 2, 3)), TypeError, ["padding", "(1, 2, 3)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), padding="full"), ValueError, ["padding", "'full'"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), stride=2, padding="same"), ValueError, ["same", "(2, 2)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), _x(3)), ValueError, ["bias", "(4,)", "(3,)"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3, dt=np.float64)), TypeError, ["float32", "float64"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), _x(4, dt=np.float64)), TypeError, ["bias: float64"]),
        (lambda: fastkern.conv2d(_x(1, 3, 5, 5, dt=np.int32), _x(4, 3, 3, 3)), TypeError, ["x", "int32"]),
        (lambda: fastkern.conv2d([[1.0]], _x(4, 3, 3, 3)), TypeError, ["x", "list"]),
        (lambda: fastkern.conv1d(_x(1, 3, 5, 5), _x(4, 3, 3)), ValueError, ["x", "3-D"]),
        (lambda: fastkern.conv3d(_x(1, 3, 5, 5), _x(4, 3, 3, 3, 3)), ValueError, ["x", "5-D"]),
        (lambda: fastkern.conv2d_backward(_x(1, 4, 3, 4), _x(1, 3, 5, 5), _x(4, 3, 3, 3)), ValueError,
         ["grad_y", "(1, 4, 3, 4)", "(1, 4, 3, 3)"]),
        (lambda: fastkern.conv2d_backward(_x(1, 4, 3, 3, dt=np.float64), _x(1, 3, 5, 5), _x(4, 3, 3, 3)), TypeError,
         ["grad_y: float64"]),
        (lambda: fastkern.conv2d_backward(_x(1, 4, 3, 3), _x(1, 2, 5, 5), _x(4, 3, 3, 3)), ValueError, ["2 channels"]),
        (lambda: fastkern.im2col(_x(1, 2, 5, 5), 6), ValueError, ["(6, 6)", "(5, 5)"]),
        (lambda: fastkern.col2im(_x(1, 8, 9), (5, 5), 2), ValueError, ["(1, 8, 9)", "16 blocks"]),
    ],
)
def test_bad_input_raises_naming_the_values(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_empty_batch_gives_empty_results():
    y = fastkern.conv2d(_x(0, 3, 5, 5), _x(4, 3, 3, 3))
    assert y.shape == (0, 4, 3, 3)
    dx, dw, db = fastkern.conv2d_backward(_x(0, 4, 3, 3), _x(0, 3, 5, 5), _x(4, 3, 3, 3))
    assert dx.shape == (0, 3, 5, 5) and not dw.any() and not db.any()


@pytest.mark.parametrize(
    "cin, stride, padding",
    [(1, 1, 2), (8, 1, 1), (3, 2, 1)],  # wide grid (narrow and wider layers), explicit columns
)
def test_backward_without_input_grad_matches_the_full_backward(cin, stride, padding):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, cin, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, cin, 3, 3)).astype(np.float32)
    gy = rng.standard_normal(fastkern.conv2d(x, w, stride=stride, padding=padding).shape).astype(np.float32)
    full = fastkern.conv2d_backward(gy, x, w, stride=stride, padding=padding)
    gx, gw, gb = fastkern.conv2d_backward(gy, x, w, stride=stride, padding=padding, input_grad=False)
    assert gx is None
    np.testing.assert_allclose(gw, full[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, full[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("width", [8, 21])
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_relu_matches_relu_of_the_reference(stride, width, dtype):
    # output rows of less than, and of more than one vector with a ragged end (masked stores)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 9, width)).astype(dtype)
    w = rng.standard_normal((5, 4, 3, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    x[0, 0, 4, 4] = np.nan
    y = fastkern.conv2d(x, w, b, stride=stride, padding=1, activation="relu")
    ref = naive_conv(x, w, b, stride, 1, 1, 1)
    ref = np.where(ref < 0, 0, ref)  # NaN passes through, as torch.relu does
    np.testing.assert_allclose(y, ref, **tol(np.dtype(dtype)))
    assert np.isnan(y).any()
    np.testing.assert_allclose(fastkern.conv2d(x, w, b, stride=stride, padding=1), naive_conv(x, w, b, stride, 1, 1, 1),
                               **tol(np.dtype(dtype)))
    with pytest.raises(ValueError, match="activation"):
        fastkern.conv2d(x, w, b, activation="gelu")


@pytest.mark.parametrize("source", [None, "columns", "direct"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_backward_through_fused_relu_masks_grad_y_by_the_output(nd, source, monkeypatch):
    monkeypatch.setattr(conv_mod, "_FORCE", source)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 4) + (7,) * nd)
    w = rng.standard_normal((6, 2) + (3,) * nd)
    b = rng.standard_normal(6)
    args = dict(padding=1, groups=2)
    y = FWD[nd](x, w, b, activation="relu", **args)
    gy = rng.standard_normal(y.shape)
    masked = gy * (y > 0)  # the ReLU's gradient, applied by hand
    want = BWD[nd](masked, x, w, **args)
    got = BWD[nd](gy, x, w, activation="relu", output=y, **args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[2], masked.sum(axis=tuple(i for i in range(nd + 2) if i != 1)), rtol=1e-12)


def test_backward_through_fused_relu_rejects_bad_output():
    x, w = np.ones((2, 3, 6, 6)), np.ones((4, 3, 3, 3))
    y = fastkern.conv2d(x, w, activation="relu")
    gy = np.ones_like(y)
    with pytest.raises(ValueError, match="output has shape"):
        fastkern.conv2d_backward(gy, x, w, activation="relu", output=y[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        fastkern.conv2d_backward(gy, x, w, activation="relu", output=y.astype(np.float32))
    with pytest.raises(ValueError, match="needs the forward's output"):
        fastkern.conv2d_backward(gy, x, w, activation="relu")
    with pytest.raises(ValueError, match="needs the forward's output"):
        fastkern.conv2d_backward(gy, x, w, output=y)
    with pytest.raises(ValueError, match="activation must be"):
        fastkern.conv2d_backward(gy, x, w, activation="gelu", output=y)


# ---------------------------------------------------------------------------
# Backward through a following 2x2 max pool (pool_indices)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("source,thread_bytes", [(None, None), (None, 1 << 12), ("columns", None),
                                                 ("direct", None), ("direct", 1 << 12)])
@pytest.mark.parametrize("shape", [(3, 4, 9, 9, 1, 1), (2, 3, 11, 8, 2, 1), (2, 4, 10, 12, 1, 0), (1, 2, 7, 5, 1, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_through_a_max_pool_is_the_pool_backward_then_the_conv_backward(shape, source, thread_bytes,
                                                                                 relu, monkeypatch):
    # odd output sizes (a last row or column in no window), stride 2, groups, and bands of
    # rows (a small per-thread budget) over every column source
    monkeypatch.setattr(conv_mod, "_FORCE", source)
    if thread_bytes:
        monkeypatch.setattr(conv_mod, "_THREAD_BYTES", thread_bytes)
    n, c, h, w, stride, padding = shape
    rng = np.random.default_rng(h * w)
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((4, c // 2 if c % 2 == 0 else c, 3, 3))
    groups = 2 if c % 2 == 0 else 1
    b = rng.standard_normal(4)
    act = "relu" if relu else None
    y = fastkern.conv2d(x, wt, b, stride, padding, groups=groups, activation=act)
    pooled, idx = fastkern.max_pool2d(y, 2, return_indices=True)
    g = rng.standard_normal(pooled.shape)
    want = fastkern.conv2d_backward(fastkern.max_pool2d_backward(g, idx, y.shape, 2), x, wt, stride, padding,
                                    groups=groups, activation=act, output=y if relu else None)
    got = fastkern.conv2d_backward(g, x, wt, stride, padding, groups=groups, activation=act,
                                   output=pooled if relu else None, pool_indices=idx)
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("source,thread_bytes", [(None, None), (None, 1 << 12), ("columns", None),
                                                 ("direct", None), ("direct", 1 << 12)])
@pytest.mark.parametrize("shape", [(3, 4, 9, 9, 1, 1), (1, 3, 11, 8, 2, 1), (2, 1, 28, 28, 1, 2), (1, 2, 7, 5, 1, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_with_max_pool_is_max_pool2d_of_the_conv(shape, source, thread_bytes, dtype, monkeypatch):
    # the epilogue's pool: bit for bit what max_pool2d returns, with and without ReLU and bias,
    # on odd sizes, bands of rows, a single sample split over threads and every column source
    monkeypatch.setattr(conv_mod, "_FORCE", source)
    if thread_bytes:
        monkeypatch.setattr(conv_mod, "_THREAD_BYTES", thread_bytes)
    n, c, h, w, stride, padding = shape
    rng = np.random.default_rng(h + w)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    groups = 2 if c % 2 == 0 else 1
    wt = rng.standard_normal((4, c // groups, 3, 3)).astype(dtype)
    for act in ("relu", None):
        for b in (rng.standard_normal(4).astype(dtype), None):
            want = fastkern.max_pool2d(fastkern.conv2d(x, wt, b, stride, padding, groups=groups, activation=act), 2,
                                       return_indices=True)
            got = fastkern.conv2d(x, wt, b, stride, padding, groups=groups, activation=act, max_pool=2)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_forward_with_max_pool_rejects_other_pools():
    x, w = np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3))
    for bad in (3, True, "2"):
        with pytest.raises(ValueError, match="max_pool must be None or 2"):
            fastkern.conv2d(x, w, max_pool=bad)
    with pytest.raises(ValueError, match="at least 2 x 2"):
        fastkern.conv2d(x[:, :, :3], w, max_pool=2)
    y, idx = fastkern.conv2d(np.ones((0, 2, 5, 5)), w, max_pool=2)
    assert y.shape == idx.shape == (0, 3, 1, 1) and idx.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_relu_max_pool_forward_and_backward_match_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 13, 12)).astype(dtype)
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    pooled, idx = fastkern.conv2d(x, w, b, padding=1, activation="relu", max_pool=2)
    g = rng.standard_normal(pooled.shape).astype(dtype)
    dx, dw, db = fastkern.conv2d_backward(g, x, w, padding=1, activation="relu", output=pooled, pool_indices=idx)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    pt = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(xt, wt, bt, padding=1)), 2)
    pt.backward(torch.tensor(g))
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pooled, pt.detach().numpy(), **t)
    assert (idx == torch.nn.functional.max_pool2d(
        torch.relu(torch.nn.functional.conv2d(xt, wt, bt, padding=1)), 2, return_indices=True)[1].numpy()).mean() > 0.99
    for mine, theirs in ((dx, xt), (dw, wt), (db, bt)):
        np.testing.assert_allclose(mine, theirs.grad.numpy(), **t)


def test_backward_through_a_max_pool_rejects_bad_indices_and_shapes():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    y = fastkern.conv2d(x, w, activation="relu")
    pooled, idx = fastkern.max_pool2d(y, 2, return_indices=True)
    g = np.ones_like(pooled)
    args = dict(activation="relu", output=pooled)
    bad = idx.copy()
    bad[0, 0, 0, 0] += 2  # in the plane but outside its window
    with pytest.raises(ValueError, match="1 of pool_indices' 32 entries are outside"):
        fastkern.conv2d_backward(g, x, w, pool_indices=bad, **args)
    with pytest.raises(TypeError, match="pool_indices must be an int64"):
        fastkern.conv2d_backward(g, x, w, pool_indices=idx.astype(np.int32), **args)
    with pytest.raises(ValueError, match="pool_indices has shape"):
        fastkern.conv2d_backward(g, x, w, pool_indices=idx[:1], **args)
    with pytest.raises(ValueError, match="grad_y has shape .* 2x2 max pool"):
        fastkern.conv2d_backward(np.ones_like(y), x, w, pool_indices=idx, **args)
    with pytest.raises(ValueError, match="pooled output shape"):
        fastkern.conv2d_backward(g, x, w, pool_indices=idx, activation="relu", output=y)
    with pytest.raises(ValueError, match="at least 2 x 2"):
        fastkern.conv2d_backward(np.ones((2, 4, 0, 0)), x[:, :, :3, :4], w, pool_indices=np.zeros((2, 4, 0, 0), np.int64))


@pytest.mark.parametrize("w_shape, padding, dilation, width", [
    ((4, 3, 3, 3), 1, 1, 17),          # one border column shared by each pair of rows
    ((4, 3, 5, 5), 2, 1, 18),
    ((4, 3, 2, 4), "same", 1, 18),     # total padding 3: 1 before, 2 after; 1 shared
    ((4, 3, 3, 3), 2, (1, 2), 18),     # dilated: reach 4, padding 2 on each side
    ((4, 3, 1, 1), 1, 1, 18),          # a 1x1 kernel reaches no border: nothing shared
])
def test_wide_grid_rows_share_a_border_column(w_shape, padding, dilation, width, monkeypatch):
    # Each row of the wide grid ends where the next begins, with one run of zeros serving as
    # the right border of one and the left border of the other. Large values in the first
    # and last input columns show any window that reads the wrong side of that border.
    monkeypatch.setattr(conv_mod, "_FORCE", "wide")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 7, 16))
    x[..., 0] += 1e3
    x[..., -1] -= 1e3
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    args = dict(stride=1, padding=padding, dilation=dilation, groups=1)
    ref = naive_conv(x, w, b, **args)
    np.testing.assert_allclose(fastkern.conv2d(x, w, b, **args), ref, rtol=1e-12, atol=1e-9)
    plan = next(c.plan for c in reversed(list(conv_mod._CALLS.values())) if c.x5_shape[2:] == (1, 7, 16))
    assert plan.grid[2] == width
    gy = rng.standard_normal(ref.shape)
    u, v = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    dx, dw, db = fastkern.conv2d_backward(gy, x, w, **args)
    np.testing.assert_allclose(np.sum(dx * u), np.sum(gy * naive_conv(u, w, None, **args)), rtol=1e-10)
    np.testing.assert_allclose(np.sum(dw * v), np.sum(gy * naive_conv(x, v, None, **args)), rtol=1e-10)


def naive_conv_grad_x(gy, w, x_shape, stride, padding, dilation, groups):
    # The adjoint of naive_conv's windows: each tap's window of the padded input gets W.T @ gy.
    nd = len(x_shape) - 2
    kernel = w.shape[2:]
    stride = (stride,) * nd if isinstance(stride, int) else stride
    dilation = (dilation,) * nd if isinstance(dilation, int) else dilation
    pads = _pads(padding, kernel, dilation, nd)
    gxp = np.zeros(x_shape[:2] + tuple(s + lo + hi for s, (lo, hi) in zip(x_shape[2:], pads)))
    out = gy.shape[2:]
    co, cg = w.shape[:2]
    mg = co // groups
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out))
        for g in range(groups):
            wt = w[(slice(g * mg, (g + 1) * mg), slice(None)) + tap].astype(np.float64)  # (mg, cg)
            part = np.tensordot(wt, gy[:, g * mg:(g + 1) * mg], axes=([0], [1])).swapaxes(0, 1)
            gxp[(slice(None), slice(g * cg, (g + 1) * cg)) + sl] += part
    inner = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, x_shape[2:]))
    return gxp[(slice(None), slice(None)) + inner]


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("case", [c for c in SOURCE_CASES if c[2] == 1] + [
    ((2, 3, 7, 16), (4, 3, 3, 3), 1, 1, 1, 1),          # SmallCNN-like: one shared border column
    ((8, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1),        # LeNet's second layer: no padding, staged samples
    ((2, 2, 6, 7), (3, 2, 1, 1), 1, 2, 1, 1),           # padding past a 1x1 kernel's reach
    ((2, 4, 5, 6), (6, 2, 3, 3), 1, 3, (2, 1), 2),      # padding past a dilated reach, groups
    ((1, 3, 4, 5, 6), (2, 3, 3, 2, 3), 1, (0, 1, 2), (1, 2, 1), 1),
], ids=lambda c: f"{c[0]}-{c[1]}-p{c[3]}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grad_input_gathered_or_folded_matches_reference(case, gather, dtype, monkeypatch):
    # Grad input on the wide grid either as the transposed convolution over grad_y laid among
    # zeros, or as W.T @ grad_y folded back onto the grid: both against the naive adjoint.
    # Large values on the input's edges and in grad_y's first and last columns show a
    # window that reads across a row, plane or channel boundary.
    x_shape, w_shape, stride, padding, dilation, groups = case
    monkeypatch.setattr(conv_mod, "_FORCE", "wide")
    monkeypatch.setattr(conv_mod, "_DX_GATHER", gather)
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    nd = x.ndim - 2
    x[..., 0] += 1e3
    x[..., -1] -= 1e3
    gy = rng.standard_normal(FWD[nd](x, w, None, **args).shape)
    gy[..., 0] += 1e3
    gy[..., -1] -= 1e3
    x, w, gy = x.astype(dtype), w.astype(dtype), gy.astype(dtype)
    want_x = naive_conv_grad_x(gy, w, x_shape, **args)
    want_w = naive_conv_grad_w(gy.astype(np.float64), x, w, **args)
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    for ws_fill in (0.0, np.nan):  # a previous call's values left in the scratch are never read
        conv_mod.clear_workspaces()
        conv_mod._workspace("backward", dtype, fastkern.get_num_threads(), 1 << 16)[:] = ws_fill
        dx, dw, _ = BWD[nd](gy, x, w, **args)
        call = list(conv_mod._CALLS.values())[-1]
        assert call.plan.mode == conv_mod.WIDE and call.plan.dx_gather == gather
        np.testing.assert_allclose(dx, want_x, rtol=rtol, atol=rtol * np.abs(want_x).max())
        np.testing.assert_allclose(dw, want_w, rtol=rtol, atol=rtol * np.abs(want_w).max())


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("x_shape, w_shape, padding", [((4, 6, 14, 14), (16, 6, 5, 5), 0),
                                                       ((3, 4, 9, 11), (8, 4, 3, 3), 1)])
def test_gathered_grad_input_through_relu_and_max_pool_matches_reference(x_shape, w_shape, padding, gather,
                                                                         monkeypatch):
    monkeypatch.setattr(conv_mod, "_FORCE", "wide")
    monkeypatch.setattr(conv_mod, "_DX_GATHER", gather)
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y = fastkern.conv2d(x, w, padding=padding, activation="relu")
    pooled, idx = fastkern.max_pool2d(y, 2, return_indices=True)
    g = rng.standard_normal(pooled.shape)
    dx, dw, db = fastkern.conv2d_backward(g, x, w, padding=padding, activation="relu", output=pooled,
                                          pool_indices=idx)
    gy = fastkern.max_pool2d_backward(g, idx, y.shape, 2) * (y > 0)
    args = dict(stride=1, padding=padding, dilation=1, groups=1)
    np.testing.assert_allclose(dx, naive_conv_grad_x(gy, w, x_shape, **args), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, naive_conv_grad_w(gy, x, w, **args), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, gy.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dot_shape", conv_mod.DOT_SHAPES)
@pytest.mark.parametrize("c_out, c_in, k, samples, dtype", [(6, 1, 5, 5, np.float64), (7, 2, 3, 4, np.float64),
                                                            (1, 3, 3, 2, np.float64), (16, 6, 5, 3, np.float64),
                                                            (6, 1, 5, 5, np.float32)])
def test_weight_gradient_by_each_inner_product_tile_matches_reference(dot_shape, c_out, c_in, k, samples, dtype,
                                                                      monkeypatch):
    # both tile shapes on every remainder of rows (output channels) and columns (taps),
    # one sample per pass and several staged
    monkeypatch.setattr(conv_mod, "_DOT_SHAPE", dot_shape)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((samples, c_in, 12, 11)).astype(dtype)
    w = rng.standard_normal((c_out, c_in, k, k)).astype(dtype)
    gy = rng.standard_normal((samples, c_out, 12 - k + 3, 11 - k + 3)).astype(dtype)
    t = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    for stage_vectors in (1, 1 << 20):
        monkeypatch.setattr(conv_mod, "_STAGE_VECTORS", stage_vectors)
        with fastkern.threads(2):
            dx, dw, db = fastkern.conv2d_backward(gy, x, w, padding=1)
        call = list(conv_mod._CALLS.values())[-1]
        assert call.dot and call.dot_shape == dot_shape
        np.testing.assert_allclose(dw, naive_conv_grad_w(gy, x, w, 1, padding=1), **t)
        np.testing.assert_allclose(db, gy.sum(axis=(0, 2, 3)), **t)
        np.testing.assert_allclose(dx, naive_conv_grad_x(gy, w, x.shape, 1, 1, 1, 1), **t)


def test_the_inner_product_tile_is_the_one_that_pads_least():
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert conv_mod._Call(2, x, np.zeros((6, 1, 5, 5), np.float32), None, 1, 2, 1, 1, "c", True).dot_shape == (3, 5)
    x = np.zeros((2, 6, 14, 14), np.float32)
    assert conv_mod._Call(2, x, np.zeros((16, 6, 5, 5), np.float32), None, 1, 0, 1, 1, "c", True).dot_shape == (4, 4)

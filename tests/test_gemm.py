"""fastkern.matmul against float64 numpy on random shapes, views and scalars."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

import fastkern
from fastkern import gemm
from fastkern.threads import max_threads

# 0, 1, primes, sizes around the tile (MR=8/4, NR=32) and block (KC=256, MC=128) edges.
SIZES = st.sampled_from([0, 1, 2, 3, 5, 7, 8, 13, 31, 33, 64, 97, 129, 200, 257, 263])
DTYPES = st.sampled_from(["float32", "float64"])


def _tol(dtype, k, scale=1.0):
    eps = 1e-5 if dtype == np.float32 else 1e-12
    return eps * max(k, 1) * scale


def _reference(a, b, trans_a, trans_b, alpha, beta, out):
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    ref = alpha * np.matmul(opa.astype(np.float64), opb.astype(np.float64))
    if out is not None:
        ref += beta * out.astype(np.float64)
    return ref


def _operand(rng, rows, cols, dtype, view):
    """A (rows, cols) operand as a plain, transposed, strided or sliced view."""
    if view == "T":
        return rng.standard_normal((cols, rows)).astype(dtype).T
    if view == "step":
        return rng.standard_normal((2 * rows, 3 * cols)).astype(dtype)[::2, ::3]
    if view == "slice":
        return rng.standard_normal((rows + 3, cols + 5)).astype(dtype)[2:rows + 2, 1:cols + 1]
    if view == "neg":
        return rng.standard_normal((rows, cols)).astype(dtype)[::-1]
    return rng.standard_normal((rows, cols)).astype(dtype)


VIEWS = st.sampled_from(["C", "T", "step", "slice", "neg"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=SIZES, k=SIZES, n=SIZES, dtype=DTYPES, va=VIEWS, vb=VIEWS,
       trans_a=st.booleans(), trans_b=st.booleans(), use_out=st.booleans(),
       alpha=st.sampled_from([1.0, -0.5, 2.0]), beta=st.sampled_from([0.0, 1.0, -1.5]),
       seed=st.integers(0, 2**16))
def test_matmul_matches_numpy(m, k, n, dtype, va, vb, trans_a, trans_b, use_out, alpha, beta,
                              seed):
    rng = np.random.default_rng(seed)
    a = _operand(rng, *((k, m) if trans_a else (m, k)), dtype, va)
    b = _operand(rng, *((n, k) if trans_b else (k, n)), dtype, vb)
    out = rng.standard_normal((m, n)).astype(dtype) if use_out else None
    ref = _reference(a, b, trans_a, trans_b, alpha, beta, out)
    got = fastkern.matmul(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, out=out)
    assert got.shape == (m, n) and got.dtype == np.dtype(dtype)
    if out is not None:
        assert got is out
    np.testing.assert_allclose(got, ref, rtol=0, atol=_tol(np.dtype(dtype), k, 4.0 + abs(beta)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(36864 // 8, 25, 6), (4096, 150, 16), (64, 400, 120),
                                   (64, 120, 84), (300, 700, 2100), (5, 1000, 3), (20, 300, 4200),
                                   (100, 260, 1030)])
def test_matmul_cnn_and_blocked_shapes(dtype, shape):
    m, k, n = shape
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(fastkern.matmul(a, b), ref, rtol=0, atol=_tol(np.dtype(dtype), k, 4))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("trans, m, k, n", [
    ("b", 128, 600, 256), ("b", 64, 784, 128), ("b", 70, 530, 96), ("b", 260, 300, 60),
    ("a", 256, 300, 64), ("a", 131, 520, 40), ("a", 300, 64, 600), ("a", 12, 700, 33)])
def test_packed_paths_with_a_transposed_operand(dtype, trans, m, k, n):
    # B transposed (a linear layer's W.T), K past one block: column slabs unless M spans
    # ROW_SPLIT times N's tiles, shared row blocks otherwise (the fourth shape), ragged edges.
    # A transposed (a weight gradient's gy.T): whole MR-row panels copied one vector per k,
    # the ragged last one row by row and zero padded; also against a reversed B
    rng = np.random.default_rng(4)
    a = rng.standard_normal((k, m) if trans == "a" else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans == "b" else (k, n)).astype(dtype)
    opa, opb = (a.T if trans == "a" else a), (b.T if trans == "b" else b)
    ref = opa.astype(np.float64) @ opb.astype(np.float64)
    atol = _tol(np.dtype(dtype), k, 4)
    np.testing.assert_allclose(fastkern.matmul(a, b, trans_a=trans == "a", trans_b=trans == "b"), ref,
                               rtol=0, atol=atol)
    if trans == "a":
        np.testing.assert_allclose(fastkern.matmul(a, b[:, ::-1], trans_a=True), ref[:, ::-1], rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("view", ["C", "T", "step", "slice", "neg"])
@pytest.mark.parametrize("m, k, n", [(40, 70, 100), (200, 120, 84), (64, 256, 64), (50, 9, 16),
                                     (20, 300, 40), (100, 500, 100), (128, 512, 8)])
def test_direct_path_reads_b_in_place_or_packed(dtype, view, m, k, n):
    # B's whole column tiles read in place when its rows are contiguous, the rest packed;
    # K within one block, or two with A of at most MC rows; serial and parallel drivers
    rng = np.random.default_rng(3)
    a = _operand(rng, m, k, dtype, "C")
    b = _operand(rng, k, n, dtype, view)
    out = rng.standard_normal((m, n)).astype(dtype)
    ref = _reference(a, b, False, False, 1.5, -1.0, out)
    got = fastkern.matmul(a, b, alpha=1.5, beta=-1.0, out=out)
    np.testing.assert_allclose(got, ref, rtol=0, atol=_tol(np.dtype(dtype), k, 6.0))



@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("m", [12, 13, 23, 25, 100, 3001])
@pytest.mark.parametrize("n", [1, 4, 6, 8, 9, 12, 16, 20, 24, 40, 52, 84])
def test_half_width_narrow_and_wide_tiles_cover_every_row(dtype, m, n):
    # a panel of B up to lanes/2 wide takes 12-row half-width tiles, up to lanes 8-row narrow
    # ones, up to 1.5 lanes 8-row wide ones; a ragged last tile is shifted up and each thread's
    # share ends mid-tile: every row written once, right
    rng = np.random.default_rng(6)
    a = _operand(rng, m, 30, dtype, "step")
    b = _operand(rng, 30, n, dtype, "C")
    out = rng.standard_normal((m, n)).astype(dtype)
    ref = _reference(a, b, False, False, 1.0, 0.5, out)
    for t in sorted({1, min(2, max_threads())}):
        with fastkern.threads(t):
            got = fastkern.matmul(a, b, beta=0.5, out=out.copy())
        np.testing.assert_allclose(got, ref, rtol=0, atol=_tol(np.dtype(dtype), 30, 4.0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("m, k, n", [(64, 120, 84), (50, 9, 6), (300, 40, 20), (200, 600, 50)])
def test_edge_panels_never_leak_the_columns_beside_b(dtype, m, k, n):
    # an edge panel of B is copied whole-width from B's buffer; the columns beside the
    # view (here NaN and inf) must never reach C, in the direct, narrow and packed paths
    rng = np.random.default_rng(5)
    wide = np.full((k, n + 40), np.nan, dtype)
    wide[:, n + 1::2] = np.inf
    wide[:, :n] = rng.standard_normal((k, n))
    b = wide[:, :n]
    a = rng.standard_normal((m, k)).astype(dtype)
    got = fastkern.matmul(a, b)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _reference(a, b, False, False, 1.0, 0.0, None), rtol=0,
                               atol=_tol(np.dtype(dtype), k, 6.0))

def test_beta_zero_ignores_nan_in_out():
    a = np.ones((9, 4), np.float32)
    out = np.full((9, 9), np.nan, np.float32)
    fastkern.matmul(a, a, trans_b=True, beta=0.0, out=out)
    np.testing.assert_array_equal(out, np.full((9, 9), 4.0, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_k_zero(dtype):
    a = np.ones((4, 0), dtype)
    b = np.ones((0, 3), dtype)
    np.testing.assert_array_equal(fastkern.matmul(a, b), np.zeros((4, 3), dtype))
    out = np.full((4, 3), 2.0, dtype)
    fastkern.matmul(a, b, beta=1.5, out=out)
    np.testing.assert_array_equal(out, np.full((4, 3), 3.0, dtype))
    out = np.full((4, 3), np.nan, dtype)
    fastkern.matmul(a, b, beta=0.0, out=out)
    np.testing.assert_array_equal(out, np.zeros((4, 3), dtype))


def test_empty_m_or_n():
    assert fastkern.matmul(np.ones((0, 5)), np.ones((5, 3))).shape == (0, 3)
    assert fastkern.matmul(np.ones((2, 5)), np.ones((5, 0))).shape == (2, 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_result_independent_of_thread_count(dtype):
    if max_threads() < 2:
        pytest.skip("needs 2 threads")
    rng = np.random.default_rng(2)
    for m, k, n in [(300, 400, 257), (4096, 150, 16), (3, 500, 70)]:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        with fastkern.threads(1):
            one = fastkern.matmul(a, b)
        with fastkern.threads(2):
            two = fastkern.matmul(a, b)
        np.testing.assert_allclose(one, two, rtol=0, atol=_tol(np.dtype(dtype), k))


def test_repeated_calls_are_bitwise_identical_whichever_thread_takes_a_block():
    # row blocks go to whichever thread asks first; the arithmetic of each block must not change
    if max_threads() < 2:
        pytest.skip("needs 2 threads")
    rng = np.random.default_rng(4)
    a = rng.standard_normal((1000, 600)).astype(np.float32)
    b = rng.standard_normal((600, 300)).astype(np.float32)
    with fastkern.threads(2):
        first = fastkern.matmul(a, b)
        for _ in range(5):
            np.testing.assert_array_equal(fastkern.matmul(a, b), first)
    np.testing.assert_allclose(first, a.astype(np.float64) @ b, rtol=0, atol=_tol(np.dtype(np.float32), 600, 4))


def test_a_shape_repeated_after_the_workspaces_grew_is_still_right():
    # each shape's plan keeps its scratch buffers; a larger product replaces them
    rng = np.random.default_rng(5)
    shapes = [(64, 120, 84), (9, 20, 30), (700, 300, 500), (64, 120, 84), (9, 20, 30), (30, 600, 70)]
    for dtype in ("float32", "float64"):
        for m, k, n in shapes + shapes[::-1]:
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            np.testing.assert_allclose(fastkern.matmul(a, b), a.astype(np.float64) @ b, rtol=0,
                                       atol=_tol(np.dtype(dtype), k, 4))


def test_a_planned_shape_keeps_each_calls_scalars_and_layout():
    # a shape's plan is remembered with its alpha and beta for C-contiguous operands: calls of
    # that shape with other scalars, transposed operands or another thread count must not reuse it
    rng = np.random.default_rng(6)
    for m, k, n in [(64, 120, 84), (9, 20, 30)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        at = np.ascontiguousarray(a.T)
        ref = a.astype(np.float64) @ b
        tol = _tol(np.dtype(np.float32), k, 8)
        c0 = rng.standard_normal((m, n)).astype(np.float32)
        for threads in (1, 2):
            with fastkern.threads(threads):
                for alpha, beta in [(1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (-0.5, 3.0), (1.0, 0.0)]:
                    for trans in (False, True):
                        out = c0.copy()
                        got = fastkern.matmul(at if trans else a, b, trans_a=trans, alpha=alpha, beta=beta, out=out)
                        np.testing.assert_allclose(got, alpha * ref + beta * c0, rtol=0, atol=abs(alpha) * tol + 1e-5)


@njit
def _call_gemm_serial(a, b, c, alpha, beta):
    gemm.gemm_serial(a, b, c, alpha, beta)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 5, 2), (40, 300, 50), (9, 20, 300), (130, 200, 70)])
@pytest.mark.parametrize("c_layout", ["rows", "columns"])
def test_gemm_serial_inside_njit(dtype, shape, c_layout):
    # a column-major c has no row-contiguous tiles: every tile takes the masked write-back
    m, k, n = shape
    rng = np.random.default_rng(3)
    a = rng.standard_normal((k, m)).astype(dtype).T  # transposed view
    b = rng.standard_normal((k, n)).astype(dtype)
    c = rng.standard_normal((m, n) if c_layout == "rows" else (n, m)).astype(dtype)
    c = c if c_layout == "rows" else c.T
    ref = 2.0 * (a.astype(np.float64) @ b.astype(np.float64)) - 0.5 * c
    _call_gemm_serial(a, b, c, 2.0, -0.5)
    np.testing.assert_allclose(c, ref, rtol=0, atol=_tol(np.dtype(dtype), k, 6))


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("da, db", [("int64", "int64"), ("complex64", "complex64"),
                                    ("float32", "float64"), ("float16", "float16")])
def test_bad_dtypes_raise_type_error(da, db):
    with pytest.raises(TypeError, match=f"a: {da}, b: {db}"):
        fastkern.matmul(np.ones((2, 2), da), np.ones((2, 2), db))


def test_non_array_raises_type_error():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        fastkern.matmul([[1.0]], np.ones((1, 1)))


def test_shape_mismatch_names_shapes_and_transposes():
    with pytest.raises(ValueError, match=r"a.shape=\(2, 3\) \(trans_a=False\).*b.shape=\(4, 5\) "
                                         r"\(trans_b=True\)"):
        fastkern.matmul(np.ones((2, 3)), np.ones((4, 5)), trans_b=True)
    with pytest.raises(ValueError, match="2-D"):
        fastkern.matmul(np.ones(3), np.ones((3, 2)))


def test_bad_out_raises():
    a = np.ones((3, 4))
    b = np.ones((4, 5))
    with pytest.raises(ValueError, match="shape"):
        fastkern.matmul(a, b, out=np.empty((3, 4)))
    with pytest.raises(TypeError, match="dtype"):
        fastkern.matmul(a, b, out=np.empty((3, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        fastkern.matmul(a, b, out=np.empty((5, 3)).T)
    buf = np.ones(32)
    with pytest.raises(ValueError, match="overlaps input a"):
        fastkern.matmul(buf[:16].reshape(4, 4), np.ones((4, 4)), out=buf[8:24].reshape(4, 4))


def test_out_overlapping_input_raises():
    x = np.ones((4, 4))
    with pytest.raises(ValueError, match="overlaps input b"):
        fastkern.matmul(np.ones((4, 4)), x, out=x)
    with pytest.raises(ValueError, match="overlaps input a"):
        fastkern.matmul(x, np.ones((4, 4)), out=x)
    big = np.ones((8, 4))
    with pytest.raises(ValueError, match="overlaps input a"):  # out and a: views of one array
        fastkern.matmul(big[2:6], np.ones((4, 4)), out=big[4:])
    with pytest.raises(ValueError, match="overlaps input b"):  # out a view of b, which owns
        fastkern.matmul(np.ones((4, 8)), big, out=big[:4])
    with pytest.raises(ValueError, match="overlaps input a"):  # a a view of out, which owns
        fastkern.matmul(x.T, np.ones((4, 4)), out=x)
    out = np.empty((4, 4))
    fastkern.matmul(np.ones((4, 4)), np.ones((4, 4)), out=out)  # separate arrays: no error
    fastkern.matmul(big[:4], np.ones((4, 4)), out=np.empty((4, 4)))


def test_bad_scalars_raise():
    a = np.ones((2, 2))
    with pytest.raises(TypeError, match="alpha"):
        fastkern.matmul(a, a, alpha="2")
    with pytest.raises(ValueError, match="beta"):
        fastkern.matmul(a, a, beta=float("nan"), out=np.zeros((2, 2)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plain_calls_and_fully_checked_calls_agree(dtype):
    # plain arguments take a shortcut past the full checks; numpy scalars, views and
    # transposes take the checks, and both must give the same product
    rng = np.random.default_rng(3)
    a = rng.standard_normal((37, 19)).astype(dtype)
    b = rng.standard_normal((19, 23)).astype(dtype)
    ref = a.astype(np.float64) @ b
    plain = fastkern.matmul(a, b)
    checked = fastkern.matmul(a[:, :], b, alpha=np.float64(1.0))
    out = np.full((37, 23), np.nan, dtype)
    into = fastkern.matmul(a, b, out=out, alpha=2.0, beta=0.0)
    assert into is out
    np.testing.assert_array_equal(plain, checked)
    np.testing.assert_allclose(plain, ref, rtol=0, atol=_tol(np.dtype(dtype), 19, 6))
    np.testing.assert_allclose(out, 2 * ref, rtol=0, atol=_tol(np.dtype(dtype), 19, 12))


def test_plain_looking_calls_with_bad_values_still_raise():
    a = np.ones((3, 3))
    with pytest.raises(TypeError, match="alpha"):
        fastkern.matmul(a, a, alpha=True)
    with pytest.raises(ValueError, match="alpha"):
        fastkern.matmul(a, a, alpha=float("inf"))
    out = np.empty((3, 3))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastkern.matmul(a, a, out=out)
    with pytest.raises(ValueError, match="overlaps input a"):
        fastkern.matmul(a, np.ones((3, 3)), out=a)

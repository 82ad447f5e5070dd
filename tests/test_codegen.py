"""How fastkern compiles its kernels (fastkern/_codegen.py)."""
import sys

import numba
import numpy as np
from numba import prange
from numba.core import types

import fastkern  # noqa: F401  (importing it wraps the package's kernels)
from fastkern._codegen import _launchers_unoptimized, plain_calls, thin_launch, zeros


def _kernels():
    for name, module in list(sys.modules.items()):
        if name.startswith("fastkern."):
            for value in vars(module).values():
                if isinstance(value, numba.core.registry.CPUDispatcher) and value.py_func.__module__ == name:
                    yield value


def _parallel_kernels():
    return (k for k in _kernels() if k.targetoptions.get("parallel"))


def test_every_parallel_kernel_skips_its_launch_wrappers_optimization():
    kernels = list(_parallel_kernels())
    assert len(kernels) > 40
    unwrapped = [k.py_func.__qualname__ for k in kernels if k.compile.__qualname__ != "_compiled_within.<locals>.compile"]
    assert unwrapped == []


def test_thin_launch_kernel_computes_what_numpy_does():
    def row_sums(x, out, n_threads):
        counts = zeros(1, np.int64)
        per = (x.shape[0] + n_threads - 1) // n_threads
        for t in prange(n_threads):
            for i in range(t * per, min(x.shape[0], (t + 1) * per)):
                s = 0.0
                for j in range(x.shape[1]):
                    s += x[i, j]
                out[i] = s
        return counts.size

    kernel = thin_launch(numba.njit(parallel=True)(row_sums))
    x = np.random.default_rng(0).standard_normal((37, 11))
    out = np.zeros(37)
    assert kernel(x, out, 2) == 1
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-12)


def test_a_launch_library_asked_for_a_pointer_still_gets_working_code():
    import ctypes

    import llvmlite.ir as ir

    module = ir.Module(name="twice")
    i64 = ir.IntType(64)
    fn = ir.Function(module, ir.FunctionType(i64, [i64]), name="fastkern_test_twice")
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.ret(builder.add(fn.args[0], fn.args[0]))
    codegen = numba.core.registry.cpu_target.target_context.codegen()
    from numba.core.compiler_lock import global_compiler_lock
    with global_compiler_lock, _launchers_unoptimized():
        library = codegen.create_library("parallelgufuncwrapper_test")
        library.add_ir_module(module)
        library.finalize()
        assert library.__dict__.get("_fastkern_deferred")  # no machine code yet
        address = library.get_pointer_to_function("fastkern_test_twice")
    assert not library.__dict__.get("_fastkern_deferred")
    assert ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(address)(21) == 42


def test_no_kernel_is_compiled_for_literal_arguments():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = fastkern.conv2d(x, w, padding=1, activation="relu", max_pool=2)[0]
    fastkern.conv2d_backward(rng.standard_normal((2, 4, 9, 9)).astype(np.float32), x, w, padding=1)
    fastkern.matmul(rng.standard_normal((70, 300)).astype(np.float32), rng.standard_normal((300, 40)).astype(np.float32))
    assert y.shape == (2, 4, 4, 4)
    kernels = list(_kernels())
    assert len(kernels) > 100
    literal = [(k.py_func.__qualname__, sig) for k in kernels for sig in k.signatures
               if any(isinstance(t, types.Literal) for t in sig)]
    assert literal == []


def test_plain_calls_compiles_one_version_for_every_constant():
    @numba.njit
    def scaled(x, factor):
        return x * factor

    plain_calls(scaled)

    @numba.njit
    def caller(x):
        return scaled(x, 2) + scaled(x, 3) + scaled(x, True)

    assert caller(1.5) == 1.5 * 2 + 1.5 * 3 + 1.5
    assert [str(sig) for sig in scaled.signatures] == ["(float64, int64)", "(float64, bool)"]

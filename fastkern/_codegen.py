"""How fastkern's register-tiled kernels are compiled.

Two LLVM settings decide whether a tile of scalar multiply-adds becomes packed
FMAs, and both are applied only while fastkern compiles its own kernels, never
to other Numba code in the process:

* The SLP vectorizer, which Numba leaves off, fuses the unrolled tile updates
  into vector FMAs (with ``fastmath={'contract'}``).
* Vector width. LLVM tunes several AVX-512 CPUs (Ice Lake server, Sapphire
  and Emerald Rapids) to prefer 256-bit vectors; an 8 x 32 float32 tile then
  needs 32 ymm accumulators and spills, at a third of the speed. Functions
  compiled here carry ``"prefer-vector-width"="512"`` and
  ``"min-legal-vector-width"="512"`` when the host has AVX-512 and no
  ``NUMBA_CPU_NAME`` asks for portable code.

The attributes are added to every function of the IR modules created during
the compile (a patch of ``CPUCodeLibrary.add_ir_module`` that lasts as long as
the context). Compiles are serialized by Numba's compiler lock.
"""
from __future__ import annotations

import contextlib

import numba
import numpy as np

FMA = {"contract"}  # FMA contraction only: no reassociation, NaN and inf kept


def _host_has_avx512() -> bool:
    import llvmlite.binding as ll
    return "+avx512f" in ll.get_host_cpu_features().flatten().split(",")


WIDE_VECTORS = numba.config.CPU_NAME is None and _host_has_avx512()
_WIDE_ATTRS = ('"min-legal-vector-width"="512"', '"prefer-vector-width"="512"')


def _tagging(add_ir_module):
    def add_wide_ir_module(self, ir_module):
        for fn in ir_module.functions:
            if not fn.is_declaration:
                for attr in _WIDE_ATTRS:
                    set.add(fn.attributes, attr)  # llvmlite's add() knows enum attributes only
        return add_ir_module(self, ir_module)
    return add_wide_ir_module


@contextlib.contextmanager
def vector_codegen():
    """Compile what runs inside the block with the SLP vectorizer and wide vectors."""
    from numba.core.codegen import CPUCodeLibrary
    previous = numba.config.SLP_VECTORIZE
    original = CPUCodeLibrary.add_ir_module
    numba.config.SLP_VECTORIZE = True
    if WIDE_VECTORS:
        CPUCodeLibrary.add_ir_module = _tagging(original)
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = previous
        CPUCodeLibrary.add_ir_module = original


def vectorized(dispatcher):
    """Make every compile of ``dispatcher`` (a ``@njit`` function) run under :func:`vector_codegen`."""
    compile_ = dispatcher.compile

    def compile(sig):
        with vector_codegen():
            return compile_(sig)

    dispatcher.compile = compile
    return dispatcher


@numba.njit(cache=True)
def zeros(shape, dtype):
    """``np.zeros`` for a ``parallel=True`` kernel, outside its ``prange``.

    There Numba turns ``np.zeros`` into a parallel loop of its own: a second
    launch of the thread pool on every call, 2.4 us measured. Compiled here,
    on its own, it stays a serial fill.
    """
    return np.zeros(shape, dtype)

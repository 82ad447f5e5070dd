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
import weakref

import numba
import numpy as np
from numba.core import types

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
    return _compiled_within(dispatcher, vector_codegen)


def _compiled_within(dispatcher, context):
    compile_ = dispatcher.compile

    def compile(sig):
        with context():
            return compile_(sig)

    dispatcher.compile = compile
    return dispatcher


# Libraries Numba builds around the body of a ``prange`` loop: the gufunc
# wrapper and the thread launcher. The driver links both, with the body and
# every kernel it calls, into its own module, and runs that copy.
_LAUNCH_LIBRARIES = ("parallelgufuncwrapper", "<numba.np.ufunc.wrappers._GufuncWrapper")


@contextlib.contextmanager
def _launchers_unoptimized():
    """Skip LLVM's module optimization and machine code of the two launch wrappers' libraries.

    Every library re-optimizes all the code it links, so each wrapper would
    optimize the loop body and all its kernels again, and emit machine code
    for them, that never runs: the driver's module holds the copy that does,
    and optimizes it. Their own functions still get the per-function passes.
    Nothing asks a wrapper library for a function pointer in a prange launch;
    should anything do so, its machine code is made then (``_emit_deferred``).
    """
    from numba.core.codegen import CPUCodeLibrary, JITCodeLibrary
    original = CPUCodeLibrary._optimize_final_module
    original_finalize = CPUCodeLibrary._finalize_final_module
    original_pointer = JITCodeLibrary.get_pointer_to_function

    def optimize_final_module(self):
        if not self.name.startswith(_LAUNCH_LIBRARIES):
            return original(self)
        previous = numba.config.OPT
        numba.config.OPT = type(previous)(0)
        try:
            return original(self)
        finally:
            numba.config.OPT = previous

    def finalize_final_module(self):
        if not self.name.startswith(_LAUNCH_LIBRARIES) or numba.config.DUMP_ASSEMBLY:
            return original_finalize(self)
        self._finalize_dynamic_globals()
        self._verify_declare_only_symbols()
        self._fastkern_deferred = True
        self._finalized = True

    def get_pointer_to_function(self, name):
        _emit_deferred(self)
        return original_pointer(self, name)

    CPUCodeLibrary._optimize_final_module = optimize_final_module
    CPUCodeLibrary._finalize_final_module = finalize_final_module
    JITCodeLibrary.get_pointer_to_function = get_pointer_to_function
    try:
        yield
    finally:
        CPUCodeLibrary._optimize_final_module = original
        CPUCodeLibrary._finalize_final_module = original_finalize
        JITCodeLibrary.get_pointer_to_function = original_pointer


def _emit_deferred(library):
    """Add a launch wrapper library whose machine code was skipped to the JIT engine after all."""
    if library.__dict__.pop("_fastkern_deferred", False):
        library._final_module.__library = weakref.proxy(library)
        cleanup = library._codegen._add_module(library._final_module)
        if cleanup:
            weakref.finalize(library, cleanup)
        library._finalize_specific()


def thin_launch(dispatcher):
    """Compile a ``parallel=True`` driver without re-optimizing its launch wrappers (see above).

    Measured on the LeNet5 first step with an empty cache: 31-35 s down to
    28-29 s (conv and GEMM drivers); the kernels run at the same speed
    (interleaved A/B within 2-3%).
    """
    return _compiled_within(dispatcher, _launchers_unoptimized)


def thin_launches(module):
    """Apply :func:`thin_launch` to every ``parallel=True`` kernel defined in ``module``."""
    for value in _kernels(module):
        if value.targetoptions.get("parallel"):
            thin_launch(value)


def _kernels(module):
    return [value for value in vars(module).values()
            if isinstance(value, numba.core.registry.CPUDispatcher) and value.py_func.__module__ == module.__name__]


def plain_calls(dispatcher):
    """Compile ``dispatcher`` once for its argument types, not once per constant it is called with.

    A call from compiled code passes a constant argument (``0``, ``True``,
    ``MR``) typed as that literal value, and Numba compiles a specialization
    for it. Each costs a full compile at first use, and the kernels gain
    nothing from them: LLVM propagates the constants wherever it inlines the
    call, and elsewhere they are loop bounds and strides of calls that stay
    whole. Here the literals are widened to their plain types before the
    callee is compiled or looked up. The first LeNet5 step with an empty cache
    went from 93 compiles to 74 (46 s to 36 s); GEMM and conv speed stayed
    within noise in an interleaved A/B.
    """
    resolve = dispatcher.get_call_template

    def get_call_template(args, kws):
        return resolve(tuple(types.unliteral(a) for a in args), {k: types.unliteral(v) for k, v in kws.items()})

    dispatcher.get_call_template = get_call_template
    return dispatcher


def plain_calls_in(module):
    """Apply :func:`plain_calls` to every kernel defined in ``module``."""
    for value in _kernels(module):
        plain_calls(value)


@numba.njit(cache=True)
def zeros(shape, dtype):
    """``np.zeros`` for a ``parallel=True`` kernel, outside its ``prange``.

    There Numba turns ``np.zeros`` into a parallel loop of its own: a second
    launch of the thread pool on every call, 2.4 us measured. Compiled here,
    on its own, it stays a serial fill.
    """
    return np.zeros(shape, dtype)

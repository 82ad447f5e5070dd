"""The asv suite stays runnable: every benchmark runs once, and follows the suite's rules.

No timing is asserted here. Each benchmark in ``benchmarks/bench_*.py`` is
discovered the way asv discovers it, set up on its first parameter
combination and called once, so a benchmark broken by an API change fails
``make test`` instead of showing up as a gap in the history graph. The rules
checked are the ones that keep asv's numbers meaningful:

* parameters are named (``params`` and ``param_names`` of equal length), and
  kernel timings cover ``threads`` = 1 and all threads;
* ``setup()`` warms every jitted function: the measured call compiles nothing
  (asv runs setup before every sample, and a compile in the first sample
  is a multi-second outlier);
* ``track_`` benchmarks declare a ``unit`` and return a positive, finite number;
* ``timeraw_`` benchmarks return code that compiles (asv runs it in a child
  interpreter, where a mistake only shows as a failed benchmark).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numba
import pytest
from numba.core import event as numba_event

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
# asv's benchmark types, by name prefix (asv_runner.benchmarks.*.name_regex).
KINDS = {
    "timeraw": re.compile(r"^(Timeraw[A-Z_].+)|(timeraw_.+)$"),
    "time": re.compile(r"^(Time[A-Z_].+)|(time_.+)$"),
    "track": re.compile(r"^(Track[A-Z_].+)|(track_.+)$"),
    "peakmem": re.compile(r"^(PeakMem[A-Z_].+)|(peakmem_.+)$"),
    "mem": re.compile(r"^(Mem[A-Z_].+)|(mem_.+)$"),
}
# Start-up benchmarks time a fresh interpreter, and the NumPy versions run on numpy's BLAS
# pool, sized when numpy loads: threads are not a parameter there.
NO_THREADS_PARAM = {"bench_startup", "bench_reference"}


def _modules():
    return sorted(f[:-3] for f in os.listdir(BENCH_DIR) if f.startswith("bench_") and f.endswith(".py"))


def _kind(name):
    for kind, regex in KINDS.items():
        if regex.match(name):
            return kind
    return None


class Bench:
    """One discovered benchmark: enough of asv's model to run it once."""

    def __init__(self, module, klass, attr):
        self.module, self.klass, self.attr = module, klass, attr
        self.instance = klass() if klass is not None else None
        self.func = getattr(self.instance, attr) if klass is not None else getattr(module, attr)
        self.kind = _kind(attr)
        self.name = ".".join(p for p in (module.__name__.split(".")[-1], klass and klass.__name__, attr) if p)
        params = self._attr("params", [])
        if params and not isinstance(params[0], (list, tuple)):
            params = [params]
        self.params = [list(p) for p in params]
        self.param_names = list(self._attr("param_names", []))

    def _attr(self, name, default):
        for src in (self.func, self.instance, self.module):
            if src is not None and hasattr(src, name):
                return getattr(src, name)
        return default

    def _hooks(self, name):
        hooks = []
        for src in (self.module, self.instance, self.func):
            hook = getattr(src, name, None) if src is not None else None
            if callable(hook) and hook not in hooks and hook is not self.func:
                hooks.append(hook)
        return hooks

    def first_params(self):
        return tuple(p[0] for p in self.params)

    def setup(self, args):
        for hook in self._hooks("setup"):
            hook(*args)

    def teardown(self, args):
        for hook in self._hooks("teardown"):
            hook(*args)

    def setup_cache(self):
        hook = self._attr("setup_cache", None)
        return (hook(),) if callable(hook) else ()


def discover():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    found = []
    for name in _modules():
        module = importlib.import_module(f"benchmarks.{name}")
        for attr, value in vars(module).items():
            if attr.startswith("_"):
                continue
            if inspect.isclass(value) and not inspect.isabstract(value):
                for member, fn in inspect.getmembers(value):
                    if (inspect.isfunction(fn) or inspect.ismethod(fn)) and _kind(member):
                        found.append(Bench(module, value, member))
            elif inspect.isfunction(value) and _kind(attr):
                found.append(Bench(module, None, attr))
    return found


BENCHMARKS = discover()
IDS = [b.name for b in BENCHMARKS]


class _CompileCounter(numba_event.Listener):
    """Counts entries into Numba's compiler lock: compiles and cache loads alike."""

    def __init__(self):
        self.count = 0

    def on_start(self, event):
        self.count += 1

    def on_end(self, event):
        pass


@pytest.fixture(autouse=True)
def _restore_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def test_every_bench_module_is_discovered():
    names = {b.module.__name__.split(".")[-1] for b in BENCHMARKS}
    assert set(_modules()) <= names, f"bench files without any benchmark: {set(_modules()) - names}"


def test_startup_benchmarks_exist():
    names = {b.attr for b in BENCHMARKS if b.name.startswith("bench_startup.")}
    assert {"timeraw_import_fastkern", "timeraw_first_matmul_cold_cache"} <= names


@pytest.mark.parametrize("bench", BENCHMARKS, ids=IDS)
def test_params_are_named(bench):
    if bench.params:
        assert len(bench.param_names) == len(bench.params), (
            f"{bench.name}: {len(bench.params)} params but param_names={bench.param_names}"
        )
        assert len(set(bench.param_names)) == len(bench.param_names)


@pytest.mark.parametrize(
    "bench",
    [b for b in BENCHMARKS if b.kind in ("time", "track") and b.module.__name__.split(".")[-1] not in NO_THREADS_PARAM],
    ids=lambda b: b.name,
)
def test_kernel_timings_cover_one_and_all_threads(bench):
    assert "threads" in bench.param_names, f"{bench.name}: no 'threads' parameter in {bench.param_names}"
    values = bench.params[bench.param_names.index("threads")]
    assert 1 in values and numba.config.NUMBA_NUM_THREADS in values, (
        f"{bench.name}: threads={values} must include 1 and all "
        f"({numba.config.NUMBA_NUM_THREADS}, numba.config.NUMBA_NUM_THREADS)"
    )


@pytest.mark.parametrize("bench", BENCHMARKS, ids=IDS)
def test_runs_once_on_first_params(bench):
    args = bench.setup_cache() + bench.first_params()
    try:
        bench.setup(args)
    except NotImplementedError as exc:  # asv's way to skip a benchmark
        pytest.skip(f"setup skips it: {exc}")
    try:
        if bench.kind == "timeraw":
            code = bench.func(*args)
            stmt, setup = code if isinstance(code, tuple) else (code, "")
            for part in (setup, stmt):
                compile(textwrap.dedent(part), bench.name, "exec")
            # Run it here on the warm cache: the code the child would time
            # works, without the seconds of a cold compile.
            fresh = getattr(bench.module, "_FRESH_CACHE", None)
            if fresh:
                setup = setup.replace(fresh, "")
            namespace = {}
            exec(textwrap.dedent(setup), namespace)
            exec(textwrap.dedent(stmt), namespace)
            return
        counter = _CompileCounter()
        with numba_event.install_listener("numba:compiler_lock", counter):
            result = bench.func(*args)
        if bench.kind in ("time", "track"):
            assert counter.count == 0, (
                f"{bench.name}{bench.first_params()}: the measured call compiled or loaded "
                f"{counter.count} Numba function(s); warm them in setup() with the same dtypes"
            )
        if bench.kind == "track":
            assert bench._attr("unit", None), f"{bench.name}: set .unit (e.g. 'GFLOP/s', 'images/s')"
            assert isinstance(result, (int, float)) and math.isfinite(result) and result > 0, (
                f"{bench.name} returned {result!r}"
            )
    finally:
        bench.teardown(args)


def test_asv_check_discovers_the_suite(tmp_path):
    asv = shutil.which("asv", path=os.path.dirname(sys.executable)) or shutil.which("asv")
    if asv is None:
        pytest.skip("asv is not installed (the bench extra)")
    env = dict(os.environ, HOME=str(tmp_path))  # asv check needs no machine file
    proc = subprocess.run(
        [asv, "check", "--python=same"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "No problems found" in out, out

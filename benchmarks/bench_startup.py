"""Start-up cost a user waits for: importing fastkern and the first calls.

Every ``timeraw_`` benchmark runs in a fresh interpreter whose Numba cache
directory is a new, empty temporary directory, so "cold" means import plus
JIT compilation of every kernel the call reaches, exactly what a user sees on
a machine that has never run fastkern. The warm variant fills that cache in a
separate interpreter first and then times loading the compiled kernels from
it, which is what ``cache=True`` buys on every later run.
"""
import importlib.util

# Setup code run in the child interpreter before the timed statement, and
# before numba is imported there: numba reads NUMBA_CACHE_DIR once, on import.
_FRESH_CACHE = """
import atexit, os, shutil, tempfile
_cache = tempfile.mkdtemp(prefix="fastkern-numba-cache-")
atexit.register(shutil.rmtree, _cache, True)
os.environ["NUMBA_CACHE_DIR"] = _cache
os.environ["FASTKERN_BACKGROUND_COMPILE"] = "0"
"""

# The same, but the first model step runs on NumPy while children compile the kernels
# (fastkern.background); the interpreter waits for them at exit, outside the timing,
# so that no sample's compile runs into the next one's.
_FRESH_CACHE_BACKGROUND = _FRESH_CACHE.replace('"0"', '"1"') + """
import fastkern
atexit.register(fastkern.background.wait)
"""

# Fills the fresh cache from another interpreter, so the timed statement in
# this one loads compiled code instead of compiling it. The code travels as
# hex: asv pastes setup into a triple-quoted string, which would interpret
# the escapes of a repr.
_FILL_CACHE = _FRESH_CACHE + """
import subprocess, sys
subprocess.run([sys.executable, "-c", bytes.fromhex("{hex}").decode()], check=True)
"""

_IMPORT_AND_OPERANDS = """
import numpy as np
import fastkern
a = np.ones((64, 48), np.float32)
b = np.ones((48, 32), np.float32)
"""
_MATMUL = "fastkern.matmul(a, b)"
_FIRST_MATMUL = _IMPORT_AND_OPERANDS + _MATMUL

# One forward/backward/update step of LeNet5 on a 2-image batch, through the
# public models API; the model layer is what a user meets first.
_FIRST_LENET5_STEP = """
import numpy as np
import models
model = models.LeNet5()
crit = models.CrossEntropyLoss()
opt = models.SGD(model.parameters(), lr=0.05, momentum=0.9)
x = np.zeros((2, 1, 28, 28), np.float32)
y = np.zeros(2, np.int64)
loss = crit(model(x), y)
model.backward(crit.backward())
opt.step()
opt.zero_grad()
"""


class _ColdStart:
    # One sample is one interpreter start plus compilation (seconds): few
    # samples, no warm-up run (it would fill nothing, each sample is fresh).
    rounds = 1
    repeat = (3, 5, 120.0)
    number = 1
    warmup_time = 0.0
    timeout = 600.0


class TimeStartup(_ColdStart):
    """Cold import and the first matmul, with an empty Numba cache."""

    def timeraw_import_fastkern(self):
        return "import fastkern", _FRESH_CACHE

    def timeraw_first_matmul_cold_cache(self):
        # The import is setup: this times the compilation (and one call).
        return _MATMUL, _FRESH_CACHE + _IMPORT_AND_OPERANDS

    def timeraw_first_matmul_warm_cache(self):
        # Import plus first call when the kernels come from the on-disk cache.
        return _FIRST_MATMUL, _FILL_CACHE.format(hex=_FIRST_MATMUL.encode().hex())


class TimeStartupTraining(_ColdStart):
    """The first LeNet5 training step with an empty Numba cache."""

    # About 30 s of compilation per sample.
    repeat = (2, 3, 60.0)

    def setup(self):
        if importlib.util.find_spec("models.zoo") is None:
            raise NotImplementedError("the model layer is not part of this commit")

    def timeraw_first_lenet5_step_cold_cache(self):
        return _FIRST_LENET5_STEP, _FRESH_CACHE

    def timeraw_first_lenet5_step_cold_cache_kernels_compiling_meanwhile(self):
        return _FIRST_LENET5_STEP, _FRESH_CACHE_BACKGROUND

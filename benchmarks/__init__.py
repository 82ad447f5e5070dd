import os

# Benchmarks time the compiled kernels: the first training step on an empty Numba cache
# compiles them in the foreground, not in background children (fastkern.background).
# bench_startup times both ways.
os.environ.setdefault("FASTKERN_BACKGROUND_COMPILE", "0")

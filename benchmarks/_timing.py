"""Shared timing helpers for the side-by-side comparison script (not asv benchmarks)."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, *, repeat=15, warmup=2, min_time=0.0):
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` calls.

    With ``min_time`` > 0, each sample loops ``fn`` until it has run that long
    and reports the per-call time, so sub-millisecond ops are not timer noise.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        loops, t0 = 0, time.perf_counter()
        while True:
            fn()
            loops += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        samples.append(elapsed / loops)
    return statistics.median(samples)


def interleaved_medians(fns, *, repeat=15, warmup=2, min_time=0.0, settle=0.15):
    """Medians of several callables timed in alternation, so machine noise hits all alike.

    Before each sample the callable runs untimed for ``settle`` seconds: a
    library's idle thread pool keeps spinning on the cores after its last call
    (OpenBLAS for ~2**28 cycles, libgomp for its spin count), and a sample taken
    right after switching libraries would time that contention, not the op.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < settle:
                fn()
            samples[i].append(median_seconds(fn, repeat=1, warmup=0, min_time=min_time))
    return [statistics.median(s) for s in samples]


def print_table(headers, rows):
    """Print rows as an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(c):
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.1f}"
    return str(c)


def torch_or_none():
    """torch when importable (an optional peer), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch

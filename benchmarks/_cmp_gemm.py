"""fastkern.matmul against numpy.matmul (OpenBLAS) in one process: GFLOP/s and ratio."""
from __future__ import annotations

import numpy as np

from ._timing import interleaved_medians, print_table

SQUARE = (64, 128, 256, 512, 1024, 2048)
CNN = ((36864, 25, 6), (4096, 150, 16), (64, 400, 120), (64, 120, 84))  # M x K x N
SETTLE = 0.5


def cases(quick=False):
    square = (128, 512, 1024) if quick else SQUARE
    out = []
    for dt in ("float32", "float64"):
        out += [((n, n, n), dt) for n in square]
        out += [(s, dt) for s in CNN]
    return out


def main(args):
    import fastkern
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    rows = []
    # numpy may have been imported (and OpenBLAS sized) before compare.py set
    # OPENBLAS_NUM_THREADS, so limit its pool explicitly as well.
    with threadpool_limits(limits=args.threads, user_api="blas"), fastkern.threads(args.threads):
        for (m, k, n), dt in cases(args.quick):
            a = rng.standard_normal((m, k)).astype(dt)
            b = rng.standard_normal((k, n)).astype(dt)
            out_fk = np.empty((m, n), dt)
            out_np = np.empty((m, n), dt)
            flops = 2.0 * m * n * k
            repeat = args.repeat if flops < 4e9 else max(5, args.repeat // 3)
            min_time = 0.02 if flops < 1e8 else 0.0
            # each library runs SETTLE seconds before its sample: the other's pool takes that
            # long to stop competing for the cores (both sides lose up to 40% at 0.15 s)
            t_fk, t_np = interleaved_medians(
                [lambda: fastkern.matmul(a, b, out=out_fk), lambda: np.matmul(a, b, out=out_np)],
                repeat=repeat, warmup=2, min_time=min_time, settle=SETTLE)
            rows.append((f"{m}x{k}x{n}", dt, args.threads, flops / t_fk / 1e9,
                         flops / t_np / 1e9, t_np / t_fk))
    print_table(["M x K x N", "dtype", "threads", "fastkern GFLOP/s", "numpy GFLOP/s",
                 "ratio"], rows)

"""Side-by-side speed of fastkern against its strongest peer, in one process.

    python -m benchmarks.compare gemm [--threads 2]
    python -m benchmarks.compare conv | pool | ops | train | all

Each area lives in ``benchmarks/_cmp_<area>.py`` and exposes ``main(args)``;
peers are numpy/OpenBLAS for GEMM and torch CPU (when installed) for the rest.
Times are medians of samples interleaved with the peer's, and ratios compare
the two measured in this same run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys


def _areas():
    here = os.path.dirname(__file__)
    return sorted(m.name[len("_cmp_"):] for m in pkgutil.iter_modules([here]) if m.name.startswith("_cmp_"))


def main(argv=None):
    areas = _areas()
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("area", choices=areas + ["all"])
    p.add_argument("--threads", type=int, default=2, help="threads for fastkern and the peer (default 2)")
    p.add_argument("--repeat", type=int, default=15, help="timed samples per case (median reported)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    args = p.parse_args(argv)
    # Both thread pools are sized before numpy/torch/numba load their libraries.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    for area in areas if args.area == "all" else [args.area]:
        print(f"\n== {area} ==")
        importlib.import_module(f"benchmarks._cmp_{area}").main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

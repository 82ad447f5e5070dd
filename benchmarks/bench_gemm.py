"""asv: fastkern.matmul on square and CNN-layer shapes, and its speed relative to numpy."""
import time

import numpy as np

import fastkern
from fastkern import gemm
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]
SQUARE = [64, 128, 256, 512, 1024, 2048]
# M x K x N of LeNet-style layers: conv1 and conv2 as im2col GEMMs, fc2 and fc3.
CNN = ["36864x25x6", "4096x150x16", "64x400x120", "64x120x84"]


def _operands(m, k, n, dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return a, b, np.empty((m, n), dtype)


class TimeMatmulSquare:
    """N x N x N products into a preallocated ``out``."""

    params = (SQUARE, ["float32", "float64"], THREADS)
    param_names = ["n", "dtype", "threads"]
    timeout = 300
    repeat = (1, 5, 30.0)  # few samples: 2048^3 float64 takes ~0.2 s

    def setup(self, n, dtype, threads):
        fastkern.set_num_threads(threads)
        gemm._warmup(np.dtype(dtype))
        self.a, self.b, self.out = _operands(n, n, n, dtype)
        fastkern.matmul(self.a, self.b, out=self.out)

    def time_matmul(self, n, dtype, threads):
        fastkern.matmul(self.a, self.b, out=self.out)


class TimeMatmulCNN:
    """The skinny and small products of a LeNet-sized CNN (forward GEMMs)."""

    params = (CNN, ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        gemm._warmup(np.dtype(dtype))
        m, k, n = map(int, shape.split("x"))
        self.a, self.b, self.out = _operands(m, k, n, dtype)
        self.bt = np.ascontiguousarray(self.b.T)
        fastkern.matmul(self.a, self.b, out=self.out)
        fastkern.matmul(self.a, self.bt, trans_b=True, out=self.out)

    def time_matmul(self, shape, dtype, threads):
        fastkern.matmul(self.a, self.b, out=self.out)

    def time_matmul_transposed_b(self, shape, dtype, threads):
        fastkern.matmul(self.a, self.bt, trans_b=True, out=self.out)  # x @ W.T of a linear layer


class TrackMatmulVsNumpy:
    """fastkern GFLOP/s divided by numpy.matmul GFLOP/s, timed alternately in one process
    with both libraries on the same number of threads (> 1 means faster than OpenBLAS);
    OpenBLAS's pool is capped through threadpoolctl where it is installed."""

    params = (["512x512x512", "1024x1024x1024", "2048x2048x2048"] + CNN,
              ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]
    unit = "ratio"
    timeout = 300
    repeat = (1, 1, 60.0)

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._blas_limit = None
        else:
            self._blas_limit = threadpool_limits(limits=threads, user_api="blas")
        gemm._warmup(np.dtype(dtype))
        m, k, n = map(int, shape.split("x"))
        self.a, self.b, self.out = _operands(m, k, n, dtype)
        self.out_np = np.empty_like(self.out)

    def teardown(self, shape, dtype, threads):
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()

    def track_speed_ratio_to_numpy(self, shape, dtype, threads):
        fk = lambda: fastkern.matmul(self.a, self.b, out=self.out)  # noqa: E731
        ref = lambda: np.matmul(self.a, self.b, out=self.out_np)  # noqa: E731
        loops = max(1, int(2e8 / (2 * self.a.shape[0] * self.a.shape[1] * self.b.shape[1])))
        t_fk, t_np = [], []
        for _ in range(7):
            for fn, samples in ((fk, t_fk), (ref, t_np)):
                t0 = time.perf_counter()
                for _ in range(loops):
                    fn()
                samples.append(time.perf_counter() - t0)
        return float(np.median(t_np) / np.median(t_fk))

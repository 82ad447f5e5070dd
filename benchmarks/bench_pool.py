"""asv: max, average and global average pooling, forward and backward."""
import numpy as np

import fastkern
from fastkern import pool
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]


class TimeMaxPool2d:
    """2x2 stride-2 (the fast path) and 3x3 stride-2 padded (overlapping windows) max pooling."""

    params = ([(64, 32, 32, 32), (64, 6, 28, 28)], [(2, 2, 0), (3, 2, 1)], ["float32", "float64"], THREADS)
    param_names = ["shape", "kernel_stride_padding", "dtype", "threads"]

    def setup(self, shape, ksp, dtype, threads):
        fastkern.set_num_threads(threads)
        pool._warmup(np.dtype(dtype))
        self.x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        self.y, self.idx = fastkern.max_pool2d(self.x, ksp[0], ksp[1], ksp[2], return_indices=True)
        self.gy = np.ones_like(self.y)
        self.time_forward_and_backward(shape, ksp, dtype, threads)

    def time_forward(self, shape, ksp, dtype, threads):
        fastkern.max_pool2d(self.x, ksp[0], ksp[1], ksp[2], return_indices=True)

    def time_backward(self, shape, ksp, dtype, threads):
        fastkern.max_pool2d_backward(self.gy, self.idx, self.x.shape, ksp[0], ksp[1], ksp[2])

    def time_forward_and_backward(self, shape, ksp, dtype, threads):
        _, idx = fastkern.max_pool2d(self.x, ksp[0], ksp[1], ksp[2], return_indices=True)
        fastkern.max_pool2d_backward(self.gy, idx, self.x.shape, ksp[0], ksp[1], ksp[2])


class TimeAvgPool2d:
    """3x3 stride-2 padded average pooling (torch's default count_include_pad=True)."""

    params = ([(64, 32, 32, 32)], ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        pool._warmup(np.dtype(dtype))
        self.x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        self.gy = np.ones_like(fastkern.avg_pool2d(self.x, 3, 2, 1))
        self.time_backward(shape, dtype, threads)

    def time_forward(self, shape, dtype, threads):
        fastkern.avg_pool2d(self.x, 3, 2, 1)

    def time_backward(self, shape, dtype, threads):
        fastkern.avg_pool2d_backward(self.gy, self.x.shape, 3, 2, 1)


class TimeGlobalAvgPool2d:
    """Global average pooling of the last conv map before a classifier head."""

    params = ([(256, 64, 8, 8)], ["float32"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        pool._warmup(np.dtype(dtype))
        self.x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        self.gy = fastkern.global_avg_pool2d(self.x)
        fastkern.global_avg_pool2d_backward(self.gy, shape)

    def time_forward(self, shape, dtype, threads):
        fastkern.global_avg_pool2d(self.x)

    def time_backward(self, shape, dtype, threads):
        fastkern.global_avg_pool2d_backward(self.gy, self.x.shape)

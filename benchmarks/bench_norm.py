"""asv: batch norm (training and evaluation) and dropout, forward and backward."""
import numpy as np

import fastkern
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]


class TimeBatchNorm:
    """Batch norm over (N, C, H, W) conv activations and (N, C) MLP activations."""

    params = ([(64, 32, 16, 16), (128, 256)], ["float32"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        rng = np.random.default_rng(0)
        c = shape[1]
        self.x = rng.standard_normal(shape).astype(dtype)
        self.gy = rng.standard_normal(shape).astype(dtype)
        self.gamma, self.beta = np.ones(c, dtype), np.zeros(c, dtype)
        self.rm, self.rv = np.zeros(c, dtype), np.ones(c, dtype)
        self.time_training_forward_and_backward(shape, dtype, threads)
        self.time_eval_forward(shape, dtype, threads)

    def time_training_forward(self, shape, dtype, threads):
        fastkern.batch_norm(self.x, self.gamma, self.beta, self.rm, self.rv, True, return_stats=True)

    def time_training_forward_and_backward(self, shape, dtype, threads):
        _, m, s = fastkern.batch_norm(self.x, self.gamma, self.beta, self.rm, self.rv, True, return_stats=True)
        fastkern.batch_norm_backward(self.gy, self.x, self.gamma, m, s)

    def time_eval_forward(self, shape, dtype, threads):
        fastkern.batch_norm(self.x, self.gamma, self.beta, self.rm, self.rv, False)


class TimeDropout:
    """Inverted dropout on a conv activation (mask drawn from a counter-based hash)."""

    params = ([(64, 32, 32, 32)], ["float32"], [0.5], THREADS)
    param_names = ["shape", "dtype", "p", "threads"]

    def setup(self, shape, dtype, p, threads):
        fastkern.set_num_threads(threads)
        self.x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        self.y, self.mask = fastkern.dropout(self.x, p, seed=0)
        fastkern.dropout_backward(self.y, self.mask, p)

    def time_forward(self, shape, dtype, p, threads):
        fastkern.dropout(self.x, p, seed=1)

    def time_backward(self, shape, dtype, p, threads):
        fastkern.dropout_backward(self.y, self.mask, p)

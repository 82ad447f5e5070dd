"""asv: fully connected layer forward and forward+backward on the model layer's shapes."""
import numpy as np

import fastkern
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]
from fastkern.linear import linear_backward


class TimeLinear:
    """y = x @ W.T + b for (batch, in_features, out_features)."""

    # LeNet-5's three classifier layers, then a wide MLP layer.
    params = ([(64, 400, 120), (64, 120, 84), (64, 84, 10), (128, 4096, 256)], ["float32", "float64"], THREADS)
    param_names = ["batch_in_out", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        n, fin, fout = shape
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((n, fin)).astype(dtype)
        self.w = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(dtype)
        self.b = rng.standard_normal(fout).astype(dtype)
        self.gy = rng.standard_normal((n, fout)).astype(dtype)
        self.time_forward_and_backward(shape, dtype, threads)  # compiles every kernel for dtype

    def time_forward(self, shape, dtype, threads):
        fastkern.linear(self.x, self.w, self.b)

    def time_forward_and_backward(self, shape, dtype, threads):
        fastkern.linear(self.x, self.w, self.b)
        linear_backward(self.gy, self.x, self.w)

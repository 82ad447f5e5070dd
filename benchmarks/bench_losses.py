"""asv: losses fused with their gradient (one call returns both)."""
import numpy as np

import fastkern
from fastkern import losses
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]


class TimeClassificationLosses:
    """Softmax cross-entropy and NLL on (batch, classes) logits."""

    params = ([(256, 10), (1024, 1000)], ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        losses._warmup(np.dtype(dtype))
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape).astype(dtype)
        self.labels = rng.integers(0, shape[1], shape[0])

    def time_softmax_cross_entropy(self, shape, dtype, threads):
        fastkern.softmax_cross_entropy(self.x, self.labels)

    def time_nll_loss(self, shape, dtype, threads):
        fastkern.nll_loss(self.x, self.labels)


class TimeElementwiseLosses:
    """MSE and BCE-with-logits over a dense prediction."""

    params = ([(256, 10), (64, 1, 64, 64)], ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        losses._warmup(np.dtype(dtype))
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape).astype(dtype)
        self.t = rng.uniform(0, 1, shape).astype(dtype)

    def time_mse_loss(self, shape, dtype, threads):
        fastkern.mse_loss(self.x, self.t)

    def time_binary_cross_entropy_with_logits(self, shape, dtype, threads):
        fastkern.binary_cross_entropy_with_logits(self.x, self.t)

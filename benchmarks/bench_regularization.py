"""asv: weight penalties and their gradients over one parameter tensor."""
import numpy as np

import fastkern
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]


class TimeRegularization:
    """Elastic net (L1 + L2) on a LeNet-5 sized and a 4M-element weight."""

    params = ([48_000, 4_194_304], ["float32"], THREADS)
    param_names = ["size", "dtype", "threads"]

    def setup(self, size, dtype, threads):
        fastkern.set_num_threads(threads)
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal(size).astype(dtype)
        self.grad = rng.standard_normal(size).astype(dtype)
        self.out = np.empty_like(self.w)
        self.time_elastic_net_penalty(size, dtype, threads)
        self.time_elastic_net_grad(size, dtype, threads)
        self.time_add_regularization_grad_in_place(size, dtype, threads)

    def time_elastic_net_penalty(self, size, dtype, threads):
        fastkern.elastic_net_penalty(self.w, 1e-4, 0.5)

    def time_elastic_net_grad(self, size, dtype, threads):
        fastkern.elastic_net_grad(self.w, 1e-4, 0.5, out=self.out)

    def time_add_regularization_grad_in_place(self, size, dtype, threads):
        fastkern.add_regularization_grad(self.grad, self.w, l1=1e-5, l2=1e-4)

"""asv: the fused optimizer update kernels on a 1M-element parameter."""
import numpy as np

import fastkern
from fastkern.threads import max_threads

N = 1 << 20
THREADS = [1, max_threads()] if max_threads() > 1 else [1]


class OptimizerUpdate:
    """One in-place update of a 1M-element float32/float64 parameter."""

    params = (["sgd", "sgd_nesterov", "adam", "adamw_amsgrad", "rmsprop_centered"],
              ["float32", "float64"], THREADS)
    param_names = ["update", "dtype", "threads"]

    def setup(self, update, dtype, threads):
        fastkern.set_num_threads(threads)
        rng = np.random.default_rng(0)
        self.p = rng.standard_normal(N).astype(dtype)
        self.g = rng.standard_normal(N).astype(dtype)
        self.s = [np.zeros(N, dtype) for _ in range(3)]
        self.step = 1
        self.time_update(update, dtype, threads)  # compiles (or loads) the kernel for dtype

    def time_update(self, update, dtype, threads):
        p, g, s = self.p, self.g, self.s
        if update == "sgd":
            fastkern.sgd_update(p, g, s[0], lr=1e-3, momentum=0.9)
        elif update == "sgd_nesterov":
            fastkern.sgd_update(p, g, s[0], lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
        elif update == "adam":
            fastkern.adam_update(p, g, s[0], s[1], step=self.step)
        elif update == "adamw_amsgrad":
            fastkern.adam_update(p, g, s[0], s[1], s[2], step=self.step,
                                 decoupled_weight_decay=1e-2, amsgrad=True)
        else:
            fastkern.rmsprop_update(p, g, s[0], s[1], s[2], momentum=0.9, centered=True)
        self.step += 1


class ForeachUpdateOfLeNet5Parameters:
    """One foreach update of LeNet-5's ten parameters (62k float32 elements), as a training step
    makes it: the scalars checked once, one kernel per parameter."""

    params = (["sgd", "adam", "rmsprop"], THREADS)
    param_names = ["update", "threads"]

    def setup(self, update, threads):
        from models import LeNet5
        fastkern.set_num_threads(threads)
        rng = np.random.default_rng(0)
        self.p = [p.array.copy() for p in LeNet5(seed=0).parameters()]
        self.g = [rng.standard_normal(p.shape).astype(np.float32) for p in self.p]
        self.s = [[np.zeros_like(p) for p in self.p] for _ in range(3)]
        self.time_update(update, threads)  # compiles (or loads) the kernels

    def time_update(self, update, threads):
        p, g, s = self.p, self.g, self.s
        if update == "sgd":
            fastkern.sgd_update_foreach(p, g, s[0], lr=1e-3, momentum=0.9)
        elif update == "adam":
            fastkern.adam_update_foreach(p, g, s[0], s[1], step=1)
        else:
            fastkern.rmsprop_update_foreach(p, g, s[0], lr=1e-3, momentum=0.9, centered=False)

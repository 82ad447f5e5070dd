"""asv: a training step on fastkern.reference, the NumPy versions of the ops a first run
trains on while its kernels compile in the background (fastkern.background).

They run on numpy's own BLAS pool, sized when numpy loads, so threads are not a
parameter here.
"""
import numpy as np

import fastkern
import models


class ReferenceTrainStep:
    """One LeNet5 SGD step on the NumPy versions."""

    timeout = 300

    def setup(self):
        self.model = models.LeNet5(input_grad=False)
        self.crit = models.CrossEntropyLoss()
        self.opt = models.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
        self.y = rng.integers(0, 10, 64)
        self.time_lenet5_training_step_on_numpy()

    def time_lenet5_training_step_on_numpy(self):
        with fastkern.background.on_numpy():
            self.crit(self.model(self.x), self.y)
            self.model.backward(self.crit.backward())
            self.opt.step()
            self.opt.zero_grad()

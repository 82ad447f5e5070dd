"""asv: one whole training step (forward + loss + backward + SGD momentum) per zoo model."""
import numpy as np

import fastkern
import models
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]

# (model, batch, input shape): LeNet5 and SmallCNN at the batch sizes the
# comparison with torch uses; the MLP and logistic regression on flat MNIST.
CASES = {
    "LeNet5": (64, (1, 28, 28), lambda: models.LeNet5(input_grad=False)),
    "SmallCNN": (128, (3, 32, 32), lambda: models.SmallCNN(input_grad=False)),
    "MLP": (64, (1, 28, 28), lambda: models.MLP(784, (128,), 10)),
    "LogisticRegression": (64, (1, 28, 28), lambda: models.LogisticRegression(784, 10)),
}


class TrainStep:
    """One SGD training step of a zoo model on random float32 data."""

    params = (list(CASES), THREADS)
    param_names = ["model", "threads"]
    timeout = 300

    def setup(self, name, threads):
        fastkern.set_num_threads(threads)
        batch, shape, make = CASES[name]
        self.batch = batch
        self.model = make()
        self.crit = models.CrossEntropyLoss()
        self.opt = models.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((batch,) + shape).astype(np.float32)
        self.y = rng.integers(0, 10, batch)
        for _ in range(2):  # compiles (or loads) every kernel with these exact dtypes
            self.step()

    def step(self):
        self.crit(self.model(self.x), self.y)
        self.model.backward(self.crit.backward())
        self.opt.step()
        self.opt.zero_grad()

    def time_training_step(self, name, threads):
        self.step()

    def track_images_per_second(self, name, threads):
        import time

        t0 = time.perf_counter()
        for _ in range(5):
            self.step()
        return 5 * self.batch / (time.perf_counter() - t0)

    track_images_per_second.unit = "images/s"

    def peakmem_training_step(self, name, threads):
        self.step()

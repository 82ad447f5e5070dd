"""asv: activations, forward and backward, with fresh outputs and with ``out=``."""
import numpy as np

import fastkern
from fastkern import activations
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]
SHAPES = [(64, 32, 32, 32), (64, 6, 28, 28), (256, 10)]


class TimeElementwise:
    """ReLU, leaky ReLU, sigmoid and tanh over conv-sized and logit-sized arrays."""

    params = (SHAPES, ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        activations._warmup(np.dtype(dtype))
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape).astype(dtype)
        self.gy = rng.standard_normal(shape).astype(dtype)
        self.out = np.empty_like(self.x)

    def time_relu_forward(self, shape, dtype, threads):
        fastkern.relu(self.x)

    def time_relu_forward_into_out(self, shape, dtype, threads):
        fastkern.relu(self.x, out=self.out)

    def time_relu_backward_into_out(self, shape, dtype, threads):
        fastkern.relu_backward(self.gy, self.x, out=self.out)

    def time_leaky_relu_forward_and_backward(self, shape, dtype, threads):
        fastkern.leaky_relu(self.x, 0.1, out=self.out)
        fastkern.leaky_relu_backward(self.gy, self.x, 0.1, out=self.out)

    def time_sigmoid_forward_and_backward(self, shape, dtype, threads):
        y = fastkern.sigmoid(self.x)
        fastkern.sigmoid_backward(self.gy, y, out=y)

    def time_tanh_forward_and_backward(self, shape, dtype, threads):
        y = fastkern.tanh(self.x)
        fastkern.tanh_backward(self.gy, y, out=y)


class TimeBiasRelu:
    """Fused bias + ReLU after a conv (N, C, H, W) or a linear layer (N, C)."""

    params = ([(64, 32, 32, 32), (64, 6, 28, 28), (256, 120)], ["float32", "float64"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        activations._warmup(np.dtype(dtype))
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape).astype(dtype)
        self.b = rng.standard_normal(shape[1]).astype(dtype)
        self.gy = rng.standard_normal(shape).astype(dtype)
        self.y, self.gx = np.empty_like(self.x), np.empty_like(self.x)

    def time_forward(self, shape, dtype, threads):
        fastkern.bias_relu(self.x, self.b, out=self.y)

    def time_forward_and_backward(self, shape, dtype, threads):
        fastkern.bias_relu(self.x, self.b, out=self.y)
        fastkern.bias_relu_backward(self.gy, self.y, out=self.gx)


class TimeSoftmax:
    """Softmax and log-softmax over classifier logits and over the channels of a feature map."""

    params = ([((256, 10), -1), ((512, 1000), -1), ((16, 21, 32, 32), 1)], ["float32", "float64"], THREADS)
    param_names = ["shape_axis", "dtype", "threads"]

    def setup(self, shape_axis, dtype, threads):
        fastkern.set_num_threads(threads)
        activations._warmup(np.dtype(dtype))
        rng = np.random.default_rng(0)
        shape, self.axis = shape_axis
        self.x = rng.standard_normal(shape).astype(dtype)
        self.gy = rng.standard_normal(shape).astype(dtype)
        self.y = fastkern.softmax(self.x, self.axis)
        self.ly = fastkern.log_softmax(self.x, self.axis)

    def time_softmax_forward_and_backward(self, shape_axis, dtype, threads):
        y = fastkern.softmax(self.x, self.axis)
        fastkern.softmax_backward(self.gy, y, self.axis)

    def time_log_softmax_forward_and_backward(self, shape_axis, dtype, threads):
        y = fastkern.log_softmax(self.x, self.axis)
        fastkern.log_softmax_backward(self.gy, y, self.axis)

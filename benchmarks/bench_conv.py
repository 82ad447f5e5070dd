"""asv: convolutions (wide grid, packed columns or Winograd on the GEMM micro-kernel), forward and forward+backward."""
import numpy as np

import fastkern
from fastkern.threads import max_threads

THREADS = [1, max_threads()] if max_threads() > 1 else [1]

# (N, C_in, H, W, C_out, k, stride, pad): LeNet-5's two convs, then CIFAR-style layers.
CONV2D_SHAPES = [
    (64, 1, 28, 28, 6, 5, 1, 2),
    (64, 6, 14, 14, 16, 5, 1, 0),
    (64, 3, 32, 32, 32, 3, 1, 1),
    (64, 32, 16, 16, 64, 3, 1, 1),
    (128, 64, 8, 8, 128, 3, 1, 1),
]


def _flops(shape):
    n, c, h, w, co, k, s, p = shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return 2.0 * n * co * c * k * k * oh * ow


def _arrays(x_shape, w_shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    return x, w, b


class TimeConv2d:
    """conv2d and conv2d_backward on (N, C_in, H, W, C_out, k, stride, pad)."""

    params = (CONV2D_SHAPES, ["float32"], THREADS)
    param_names = ["shape", "dtype", "threads"]

    def setup(self, shape, dtype, threads):
        fastkern.set_num_threads(threads)
        n, c, h, w, co, k, self.s, self.p = shape
        self.x, self.w, self.b = _arrays((n, c, h, w), (co, c, k, k), dtype)
        y = fastkern.conv2d(self.x, self.w, self.b, self.s, self.p)
        self.gy = np.ones_like(y)
        self.gp = np.ones_like(fastkern.conv2d(self.x, self.w, self.b, self.s, self.p, max_pool=2)[0])
        self.time_forward_and_backward(shape, dtype, threads)  # compiles every kernel for dtype
        self.time_forward_and_backward_through_relu_and_max_pool(shape, dtype, threads)

    def time_forward(self, shape, dtype, threads):
        fastkern.conv2d(self.x, self.w, self.b, self.s, self.p)

    def time_forward_with_fused_relu(self, shape, dtype, threads):
        fastkern.conv2d(self.x, self.w, self.b, self.s, self.p, activation="relu")

    def time_forward_with_fused_relu_and_max_pool(self, shape, dtype, threads):
        fastkern.conv2d(self.x, self.w, self.b, self.s, self.p, activation="relu", max_pool=2)

    def time_forward_and_backward(self, shape, dtype, threads):
        fastkern.conv2d(self.x, self.w, self.b, self.s, self.p)
        fastkern.conv2d_backward(self.gy, self.x, self.w, self.s, self.p)

    def time_forward_and_backward_through_fused_relu(self, shape, dtype, threads):
        y = fastkern.conv2d(self.x, self.w, self.b, self.s, self.p, activation="relu")
        fastkern.conv2d_backward(self.gy, self.x, self.w, self.s, self.p, activation="relu", output=y)

    def time_forward_and_backward_through_relu_and_max_pool(self, shape, dtype, threads):
        # conv, ReLU and a 2x2 max pool as one op each way (max_pool=2, pool_indices), as models' Sequential runs them
        pooled, idx = fastkern.conv2d(self.x, self.w, self.b, self.s, self.p, activation="relu", max_pool=2)
        fastkern.conv2d_backward(self.gp, self.x, self.w, self.s, self.p, activation="relu", output=pooled,
                                 pool_indices=idx)

    def track_forward_gflops(self, shape, dtype, threads):
        import time

        reps, t0 = 5, time.perf_counter()
        for _ in range(reps):
            self.time_forward(shape, dtype, threads)
        return _flops(shape) * reps / (time.perf_counter() - t0) / 1e9

    track_forward_gflops.unit = "GFLOP/s"


class TimeConv2dWinogradAgainstIm2col:
    """3x3 stride-1 layers by Winograd F(4x4, 3x3) (fastkern/winograd.py) and by the im2col GEMMs."""

    params = ([(64, 32, 16, 16, 64), (128, 64, 8, 8, 128), (32, 64, 32, 32, 64)], ["winograd", "im2col"],
              ["float32"], THREADS)
    param_names = ["shape", "algorithm", "dtype", "threads"]

    def setup(self, shape, algorithm, dtype, threads):
        from fastkern import conv
        fastkern.set_num_threads(threads)
        conv._WINOGRAD = algorithm == "winograd"  # the forced choice; teardown restores the automatic one
        n, c, h, w, co = shape
        self.x, self.w, self.b = _arrays((n, c, h, w), (co, c, 3, 3), dtype)
        self.gy = np.ones((n, co, h, w), dtype)
        self.time_forward_and_backward(shape, algorithm, dtype, threads)

    def teardown(self, shape, algorithm, dtype, threads):
        from fastkern import conv
        conv._WINOGRAD = None

    def time_forward(self, shape, algorithm, dtype, threads):
        fastkern.conv2d(self.x, self.w, self.b, padding=1)

    def time_forward_and_backward(self, shape, algorithm, dtype, threads):
        fastkern.conv2d(self.x, self.w, self.b, padding=1)
        fastkern.conv2d_backward(self.gy, self.x, self.w, padding=1)


class TimeConv1dConv3d:
    """A small conv1d (audio-like) and conv3d (video-like) layer, forward and backward."""

    params = (["conv1d", "conv3d"], ["float32"], THREADS)
    param_names = ["op", "dtype", "threads"]

    def setup(self, op, dtype, threads):
        fastkern.set_num_threads(threads)
        if op == "conv1d":
            self.x, self.w, self.b = _arrays((32, 16, 256), (32, 16, 5), dtype)
        else:
            self.x, self.w, self.b = _arrays((8, 4, 8, 16, 16), (8, 4, 3, 3, 3), dtype)
        self.fwd = getattr(fastkern, op)
        self.bwd = getattr(fastkern, op + "_backward")
        self.gy = np.ones_like(self.fwd(self.x, self.w, self.b, padding=1))
        self.time_forward_and_backward(op, dtype, threads)

    def time_forward(self, op, dtype, threads):
        self.fwd(self.x, self.w, self.b, padding=1)

    def time_forward_and_backward(self, op, dtype, threads):
        self.fwd(self.x, self.w, self.b, padding=1)
        self.bwd(self.gy, self.x, self.w, padding=1)

"""Whole training steps of the zoo models, fastkern (models/) against its torch twin.

One step = forward + cross-entropy + backward + SGD(momentum 0.9) update, on
random float32 data, both sides with ``--threads`` threads, timed interleaved
in this process. Peak RSS of each side comes from a separate child process
(so the two libraries' memory does not mix; its VmHWM, or getrusage's
ru_maxrss where /proc is missing), and the cold start (import + JIT
+ first LeNet5 step, with an empty and then a warm Numba cache) from fresh
interpreters.

    python -m benchmarks.compare train [--threads 2] [--repeat 15] [--quick]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ._timing import interleaved_medians, print_table, torch_or_none

# (name, batch, input shape, constructor of ours, constructor of the torch twin)
CASES = [
    ("LeNet5", 64, (1, 28, 28)),
    ("SmallCNN", 128, (3, 32, 32)),
    ("MLP 784-128-10", 64, (1, 28, 28)),
    ("LogisticRegression 784-10", 64, (1, 28, 28)),
]
QUICK = CASES[:1]


def make_ours(name, dtype=np.float32):
    import models

    return {
        "LeNet5": lambda: models.LeNet5(dtype=dtype, input_grad=False),
        "SmallCNN": lambda: models.SmallCNN(dtype=dtype, input_grad=False),
        "MLP 784-128-10": lambda: models.MLP(784, (128,), 10, dtype=dtype),
        "LogisticRegression 784-10": lambda: models.LogisticRegression(784, 10, dtype=dtype),
    }[name]()


def make_twin(torch, name):
    nn = torch.nn
    return {
        "LeNet5": lambda: nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, 10)),
        "SmallCNN": lambda: nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4096, 256), nn.ReLU(inplace=True), nn.Linear(256, 10)),
        "MLP 784-128-10": lambda: nn.Sequential(
            nn.Flatten(), nn.Linear(784, 128), nn.ReLU(inplace=True), nn.Linear(128, 10)),
        "LogisticRegression 784-10": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
    }[name]()


def ours_step(name, batch, shape, seed=0):
    """A closure running one fastkern training step (and the data it uses)."""
    import models

    model = make_ours(name)
    crit = models.CrossEntropyLoss()
    opt = models.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
        opt.zero_grad()

    return step


def functional_lenet5_step(batch, seed=0):
    """LeNet5's training step as bare fastkern calls, the same fused ops the model layer
    calls (conv + bias + ReLU + 2x2 max pool in one op each way, no image gradient): the
    floor it is held to."""
    import fastkern as fk

    model = make_ours("LeNet5")
    ws = [p.array for p in model.parameters()]
    bufs = [np.zeros_like(w) for w in ws]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    w1, b1, w2, b2, w3, b3, w4, b4, w5, b5 = ws

    def step():
        def relu_(a):
            return fk.relu(a, out=a)

        p1, i1 = fk.conv2d(x, w1, b1, padding=2, activation="relu", max_pool=2)
        p2, i2 = fk.conv2d(p1, w2, b2, activation="relu", max_pool=2)
        f = p2.reshape(batch, -1)
        h3 = relu_(fk.linear(f, w3, b3))
        h4 = relu_(fk.linear(h3, w4, b4))
        _, g = fk.softmax_cross_entropy(fk.linear(h4, w5, b5), y)
        g, gw5, gb5 = fk.linear_backward(g, h4, w5)
        g, gw4, gb4 = fk.linear_backward(fk.relu_backward(g, h4), h3, w4)
        g, gw3, gb3 = fk.linear_backward(fk.relu_backward(g, h3), f, w3)
        g, gw2, gb2 = fk.conv2d_backward(g.reshape(p2.shape), p1, w2, activation="relu", output=p2, pool_indices=i2)
        _, gw1, gb1 = fk.conv2d_backward(g, x, w1, padding=2, input_grad=False, activation="relu", output=p1,
                                         pool_indices=i1)
        for w, gr, b in zip(ws, (gw1, gb1, gw2, gb2, gw3, gb3, gw4, gb4, gw5, gb5), bufs):
            fk.sgd_update(w, gr, b, lr=0.01, momentum=0.9)

    return step


def torch_step(torch, name, batch, shape, seed=0):
    model = make_twin(torch, name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((batch,) + shape).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


# A child process: run `steps` training steps of one side, print peak RSS in MiB.
_RSS_CHILD = """
import resource, sys
side, name, batch, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from benchmarks import _cmp_train as c
import models
models.reuse_freed_memory()  # as in the timed run
shape = dict((n, s) for n, _, s in c.CASES)[name]
if side == "torch":
    import torch
    torch.set_num_threads(threads)
    step = c.torch_step(torch, name, batch, shape)
else:
    import fastkern
    fastkern.set_num_threads(threads)
    step = c.ours_step(name, batch, shape)
for _ in range(steps):
    step()
try:  # this process's own high-water mark: getrusage's ru_maxrss also counts the parent's
    # pages when the child was vforked, so it is only the fallback
    with open("/proc/self/status") as f:
        print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

# A child process: import + build LeNet5 + one training step, timed from interpreter start;
# then the time until the compiled kernels run a step (fastkern.background).
_COLD_CHILD = """
import time
t0 = time.perf_counter()
import numpy as np
import fastkern
import models
model = models.LeNet5()
crit = models.CrossEntropyLoss()
opt = models.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
y = np.arange(64) % 10
def step():
    crit(model(x), y)
    model.backward(crit.backward())
    opt.step()
    opt.zero_grad()
step()
first = time.perf_counter() - t0
fastkern.background.wait()
step()
print(first, time.perf_counter() - t0)
"""


def _child(code, args, env_extra, threads):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), **env_extra}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"child failed:\n{r.stderr[-2000:]}")
    return tuple(map(float, r.stdout.strip().splitlines()[-1].split())), wall


def peak_rss_mib(side, name, batch, threads, steps=20):
    return _child(_RSS_CHILD, [side, name, batch, steps, threads], {}, threads)[0][0]


def cold_start(threads):
    """Seconds from interpreter start to the end of the first LeNet5 step and to the first step on
    compiled kernels: with an empty Numba cache (the kernels compiling in the background, then
    compiling before the first step), and with the cache warm."""
    with tempfile.TemporaryDirectory() as cache:
        env = {"NUMBA_CACHE_DIR": cache, "FASTKERN_BACKGROUND_COMPILE": "1"}
        (first, compiled), _ = _child(_COLD_CHILD, [], env, threads)
        (warm, _), _ = _child(_COLD_CHILD, [], env, threads)
    with tempfile.TemporaryDirectory() as cache:
        (blocking, _), _ = _child(_COLD_CHILD, [], {"NUMBA_CACHE_DIR": cache, "FASTKERN_BACKGROUND_COMPILE": "0"},
                                  threads)
    return first, compiled, blocking, warm


def main(args):
    import fastkern
    import models

    # As models.train does: freed activations stay in the heap (both libraries benefit).
    models.reuse_freed_memory()
    torch = torch_or_none()
    fastkern.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for name, batch, shape in QUICK if args.quick else CASES:
        fns = [ours_step(name, batch, shape)]
        if torch is not None:
            fns.append(torch_step(torch, name, batch, shape))
        times = interleaved_medians(fns, repeat=args.repeat, warmup=3, min_time=0.2)
        ours = batch / times[0]
        peer = batch / times[1] if torch is not None else float("nan")
        rss = [peak_rss_mib("fastkern", name, batch, args.threads)]
        rss.append(peak_rss_mib("torch", name, batch, args.threads) if torch else float("nan"))
        rows.append([name, batch, round(ours), round(peer), f"{ours / peer:.2f}x", round(rss[0]),
                     round(rss[1])])
    if not args.quick:
        # The same LeNet5 step written as bare fastkern calls: what the model layer costs on top.
        t_mod, t_fun = interleaved_medians([ours_step("LeNet5", 64, (1, 28, 28)),
                                            functional_lenet5_step(64)],
                                           repeat=args.repeat, warmup=3, min_time=0.2)
        print(f"LeNet5 via models/ {64 / t_mod:.0f} img/s, as bare fastkern calls "
              f"{64 / t_fun:.0f} img/s: the model layer adds {100 * (t_mod / t_fun - 1):+.1f}%")
    print(f"training step (forward + loss + backward + SGD momentum), float32, "
          f"{args.threads} threads, median of {args.repeat}")
    print_table(["model", "batch", "fastkern img/s", "torch img/s", "ratio", "fastkern RSS MiB",
                 "torch RSS MiB"], rows)
    first, compiled, blocking, warm = cold_start(args.threads)
    print(f"\ncold start (interpreter + import + first LeNet5 step, batch 64), empty Numba cache: "
          f"first step done at {first:.2f} s (on NumPy while the kernels compile in the background), "
          f"compiled kernels running at {compiled:.2f} s; compiling before the first step "
          f"(FASTKERN_BACKGROUND_COMPILE=0) {blocking:.2f} s. Warm cache: {warm:.2f} s")

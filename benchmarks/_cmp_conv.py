"""conv2d forward and forward+backward, fastkern against torch CPU (float32, same process)."""
from __future__ import annotations

import numpy as np

from ._timing import interleaved_medians, print_table, torch_or_none

# (N, C_in, H, W, C_out, k, stride, pad): LeNet-5's two convs, then CIFAR-style layers.
SHAPES = [
    (64, 1, 28, 28, 6, 5, 1, 2),
    (64, 6, 14, 14, 16, 5, 1, 0),
    (64, 3, 32, 32, 32, 3, 1, 1),
    (64, 32, 16, 16, 64, 3, 1, 1),
    (128, 64, 8, 8, 128, 3, 1, 1),
]
QUICK = [(16, 3, 16, 16, 8, 3, 1, 1), (16, 16, 8, 8, 32, 3, 1, 1)]


def flops(shape):
    n, c, h, w, co, k, s, p = shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return 2.0 * n * co * c * k * k * oh * ow


def main(args):
    import fastkern
    from fastkern import conv as conv_mod
    from fastkern.threads import max_threads

    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(args.threads)
    fastkern.set_num_threads(min(args.threads, max_threads()))
    rng = np.random.default_rng(0)
    rows = []
    for shape in QUICK if args.quick else SHAPES:
        n, c, h, w, co, k, s, p = shape
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = (rng.standard_normal((co, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        b = rng.standard_normal(co).astype(np.float32)
        y = fastkern.conv2d(x, wt, b, s, p)
        g = rng.standard_normal(y.shape).astype(np.float32)

        def fk_fwd():
            fastkern.conv2d(x, wt, b, s, p)

        def fk_fb():
            fastkern.conv2d(x, wt, b, s, p)
            fastkern.conv2d_backward(g, x, wt, s, p)

        fns = [fk_fwd, fk_fb]
        if torch is not None:
            tx, tw, tb, tg = (torch.from_numpy(a.copy()) for a in (x, wt, b, g))
            txg, twg, tbg = (a.clone().requires_grad_() for a in (tx, tw, tb))

            def th_fwd():
                with torch.no_grad():
                    torch.nn.functional.conv2d(tx, tw, tb, s, p)

            def th_fb():
                for a in (txg, twg, tbg):
                    a.grad = None
                torch.nn.functional.conv2d(txg, twg, tbg, s, p).backward(tg)

            fns += [th_fwd, th_fb]
        times = interleaved_medians(fns, repeat=args.repeat, warmup=3, min_time=0.02)
        fk_f, fk_b = times[0] * 1e3, times[1] * 1e3
        th_f, th_b = (times[2] * 1e3, times[3] * 1e3) if torch is not None else (float("nan"),) * 2
        rows.append([
            str(shape), fk_f, th_f, fk_f / th_f, fk_b, th_b, fk_b / th_b,
            flops(shape) / times[0] / 1e9, 3 * flops(shape) / times[1] / 1e9, conv_mod.peak_workspace_bytes(),
        ])
    print(f"conv2d float32, {args.threads} threads, medians of {args.repeat} interleaved samples (ms)")
    print_table(
        ["(N,Cin,H,W,Cout,k,s,p)", "fk fwd", "torch fwd", "ratio", "fk fwd+bwd", "torch fwd+bwd", "ratio",
         "fk fwd GFLOP/s", "fk f+b GFLOP/s", "peak ws bytes"],
        rows,
    )

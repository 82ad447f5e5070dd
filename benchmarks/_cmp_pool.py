"""max_pool2d 2x2 stride 2, forward + backward, against torch CPU (autograd) in the same run.

Both sides do the same work per step: the forward returns the pooled map and
the int64 argmax indices (torch's autograd keeps them for its backward), the
backward scatters grad_y into a fresh grad_x.
"""
from __future__ import annotations

import numpy as np

from ._timing import interleaved_medians, print_table, torch_or_none

SHAPES = [(64, 32, 32, 32), (64, 6, 28, 28), (256, 16, 14, 14)]


def main(args):
    import fastkern as fk

    fk.set_num_threads(args.threads)
    fk.warmup(("float32",))
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for shape in shapes:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

        def fk_fwd():
            return fk.max_pool2d(x, 2, return_indices=True)

        y, idx = fk_fwd()
        g = np.ones_like(y)

        def fk_bwd():
            return fk.max_pool2d_backward(g, idx, x.shape, 2)

        def fk_step():
            y, idx = fk.max_pool2d(x, 2, return_indices=True)
            return fk.max_pool2d_backward(g, idx, x.shape, 2)

        fns = [fk_step, fk_fwd, fk_bwd]
        if torch is not None:
            tx, tg = torch.from_numpy(x), torch.from_numpy(g)

            def torch_step():
                t = tx.detach().requires_grad_()
                torch.nn.functional.max_pool2d(t, 2).backward(tg)
                return t.grad

            fns.append(torch_step)
        t = interleaved_medians(fns, repeat=args.repeat, min_time=0.02)
        peer = t[3] if torch is not None else float("nan")
        rows.append([str(shape), t[1] * 1e3, t[2] * 1e3, t[0] * 1e3, peer * 1e3, t[0] / peer])
    print(f"max_pool2d k=2 s=2 float32, {args.threads} threads, medians of {args.repeat} (ms)")
    print_table(["input", "fk fwd", "fk bwd", "fk fwd+bwd", "torch fwd+bwd", "fk/torch"], rows)
    print("target: fk/torch <= 0.2 on (64, 32, 32, 32)")

"""ReLU, fused bias + ReLU and softmax cross-entropy, forward + backward, against torch CPU.

Bytes moved per step (float32), counted as the minimum each op must touch:
  relu       forward reads x, writes y; backward reads grad_y and x, writes grad_x   -> 5 * size
  bias_relu  forward reads x, writes y; backward reads grad_y and y, writes grad_x   -> 5 * size
             (the (C,) bias and its gradient are negligible)
  softmax CE one fused pass reads logits and writes grad_logits                      -> 2 * size
GB/s divides those bytes by the median step time; "copy" is np.copyto of the
same array measured in the same run (it moves 2 * size bytes), so fk/copy is
the fraction of the machine's achievable copy bandwidth. "fk out=" reuses
preallocated outputs (the training-loop pattern); "fk" allocates fresh ones.
"""
from __future__ import annotations

import numpy as np

from ._timing import interleaved_medians, print_table, torch_or_none

SHAPES = [(64, 6, 28, 28), (64, 32, 32, 32), (256, 10)]


def _cases(fk, torch, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    y, gx = np.empty_like(x), np.empty_like(x)
    c = shape[1]
    b = rng.standard_normal(c).astype(np.float32)
    F = torch.nn.functional if torch is not None else None
    tx, tg, tb = (torch.from_numpy(a) for a in (x, g, b)) if torch is not None else (None,) * 3
    bview = (1, c) + (1,) * (len(shape) - 2)

    def relu_fresh():
        fk.relu(x)
        return fk.relu_backward(g, x)

    def relu_out():
        fk.relu(x, out=y)
        return fk.relu_backward(g, x, out=gx)

    def relu_torch():
        t = tx.detach().requires_grad_()
        F.relu(t).backward(tg)

    def bias_fresh():
        yy = fk.bias_relu(x, b)
        return fk.bias_relu_backward(g, yy)

    def bias_out():
        fk.bias_relu(x, b, out=y)
        return fk.bias_relu_backward(g, y, out=gx)

    def bias_torch():
        t, tbb = tx.detach().requires_grad_(), tb.detach().requires_grad_()
        F.relu(t + tbb.view(bview)).backward(tg)

    yield "relu", x.size * 4 * 5, relu_fresh, relu_out, relu_torch
    if len(shape) > 2:
        yield "bias_relu", x.size * 4 * 5, bias_fresh, bias_out, bias_torch
    else:
        labels = rng.integers(0, c, shape[0])
        tl = torch.from_numpy(labels) if torch is not None else None

        def ce():
            return fk.softmax_cross_entropy(x, labels)

        def ce_torch():
            t = tx.detach().requires_grad_()
            F.cross_entropy(t, tl).backward()

        yield "softmax_ce", x.size * 4 * 2, ce, None, ce_torch


def main(args):
    import fastkern as fk

    fk.set_num_threads(args.threads)
    fk.warmup(("float32",))
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES[1:2] if args.quick else SHAPES:
        src = rng.standard_normal(shape).astype(np.float32)
        dst = np.empty_like(src)

        def copy():
            np.copyto(dst, src)

        for name, nbytes, fresh, out, peer in _cases(fk, torch, shape, rng):
            fns = [copy, fresh] + ([out] if out else []) + ([peer] if torch is not None else [])
            t = interleaved_medians(fns, repeat=args.repeat, min_time=0.01)
            t_copy, t_fresh = t[0], t[1]
            t_out = t[2] if out else float("nan")
            t_peer = t[-1] if torch is not None else float("nan")
            best = min(t_fresh, t_out) if out else t_fresh
            copy_gbs = 2 * src.nbytes / t_copy / 1e9
            fk_gbs = nbytes / best / 1e9
            rows.append([name, str(shape), t_fresh * 1e6, t_out * 1e6, t_peer * 1e6,
                         fk_gbs, copy_gbs, fk_gbs / copy_gbs, t_fresh / t_peer, best / t_peer])
    print(f"forward + backward, float32, {args.threads} threads, medians of {args.repeat} (microseconds)")
    print_table(["op", "shape", "fk us", "fk out= us", "torch us", "fk GB/s", "copy GB/s", "fk/copy",
                 "fk/torch", "fk out=/torch"], rows)
    print("GB/s and fk/copy use the faster fastkern variant. targets: fk/copy >= 0.5 on the two large "
          "shapes; fk/torch < 1 everywhere")

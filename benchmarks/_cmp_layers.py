"""linear, batch norm and dropout, fastkern against torch CPU (float32, same process)."""
from __future__ import annotations

import numpy as np

import itertools
import time

from ._timing import median_seconds, print_table, torch_or_none

LINEAR = [(64, 400, 120), (64, 120, 84), (64, 84, 10), (128, 4096, 256)]
BATCH_NORM = [(64, 32, 16, 16), (128, 256)]
DROPOUT = [(64, 32, 32, 32)]
QUICK = dict(linear=LINEAR[:1], batch_norm=BATCH_NORM, dropout=[(8, 32, 32, 32)])


def _linear_cases(fk, torch, rng):
    for n, fin, fout in LINEAR:
        x = rng.standard_normal((n, fin)).astype(np.float32)
        w = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(np.float32)
        b = rng.standard_normal(fout).astype(np.float32)
        gy = rng.standard_normal((n, fout)).astype(np.float32)

        def fk_fb():
            fk.linear(x, w, b)
            fk.linear_backward(gy, x, w)

        fns = [lambda: fk.linear(x, w, b), fk_fb]
        if torch is not None:
            F = torch.nn.functional
            tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
            tgy = torch.from_numpy(gy)

            def th_fwd():
                with torch.no_grad():
                    F.linear(tx, tw, tb)

            def th_fb():
                tx.grad = tw.grad = tb.grad = None
                F.linear(tx, tw, tb).backward(tgy)

            fns += [th_fwd, th_fb]
        yield f"linear {n}x{fin}->{fout}", fns


def _batch_norm_cases(fk, torch, rng):
    for shape in BATCH_NORM:
        c = shape[1]
        x = rng.standard_normal(shape).astype(np.float32)
        gy = rng.standard_normal(shape).astype(np.float32)
        g, b, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)

        def fk_fb():
            _, m, s = fk.batch_norm(x, g, b, rm, rv, True, return_stats=True)
            fk.batch_norm_backward(gy, x, g, m, s)

        fns = [lambda: fk.batch_norm(x, g, b, rm, rv, True, return_stats=True), fk_fb]
        if torch is not None:
            F = torch.nn.functional
            tx, tg, tb = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, g, b))
            trm, trv, tgy = torch.zeros(c), torch.ones(c), torch.from_numpy(gy)

            def th_fwd():
                with torch.no_grad():
                    F.batch_norm(tx, trm, trv, tg, tb, True)

            def th_fb():
                tx.grad = tg.grad = tb.grad = None
                F.batch_norm(tx, trm, trv, tg, tb, True).backward(tgy)

            fns += [th_fwd, th_fb]
        yield f"batch_norm train {shape}", fns


def _dropout_cases(fk, torch, rng, shapes):
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        _, mask = fk.dropout(x, 0.5, 0)

        def fk_fb():
            y, m = fk.dropout(x, 0.5, 1)
            fk.dropout_backward(y, m, 0.5)

        fns = [lambda: fk.dropout(x, 0.5, 1), fk_fb]
        if torch is not None:
            tx = torch.from_numpy(x.copy()).requires_grad_()
            tgy = torch.from_numpy(x)

            def th_fwd():
                with torch.no_grad():
                    torch.nn.functional.dropout(tx, 0.5, True)

            def th_fb():
                tx.grad = None
                torch.nn.functional.dropout(tx, 0.5, True).backward(tgy)

            fns += [th_fwd, th_fb]
        yield f"dropout {shape}", fns


def blocked_medians(fns, *, repeat, min_time=0.02, settle=0.3):
    """Median of each callable, timed one after the other rather than interleaved.

    numba's and torch's OpenMP pools both spin-wait after a parallel region; on
    2 cores, alternating them call by call makes each wait out the other's
    spinning threads and measures that contention, not the kernels (calls up
    to 100x slower). Each callable first runs ``settle`` seconds so the other
    pool has gone to sleep.
    """
    out = []
    for fn in fns:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < settle:
            fn()
        out.append(median_seconds(fn, repeat=repeat, warmup=0, min_time=min_time))
    return out


def main(args):
    import fastkern as fk
    from fastkern.threads import max_threads

    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(args.threads)
    fk.set_num_threads(min(args.threads, max_threads()))
    rng = np.random.default_rng(0)
    # Each case is timed before the generator moves on: its closures read the
    # generator's current arrays.
    cases = itertools.chain(
        itertools.islice(_linear_cases(fk, torch, rng), 1 if args.quick else None),
        _batch_norm_cases(fk, torch, rng),
        _dropout_cases(fk, torch, rng, QUICK["dropout"] if args.quick else DROPOUT),
    )
    rows = []
    for name, fns in cases:
        t = blocked_medians(fns, repeat=args.repeat)
        row = [name, t[0] * 1e6, t[1] * 1e6]
        if torch is not None:
            row += [t[2] * 1e6, t[3] * 1e6, t[2] / t[0], t[3] / t[1]]
        rows.append(row)
    headers = ["case (float32)", "fk fwd us", "fk fwd+bwd us"]
    if torch is not None:
        headers += ["torch fwd us", "torch fwd+bwd us", "fwd speedup", "fwd+bwd speedup"]
    print_table(headers, rows)

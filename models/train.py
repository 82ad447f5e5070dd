"""Train a zoo model from the command line.

    python -m models.train --out runs/default                  # LeNet5 on the bundled digits
    python -m models.train --model lenet5 --data digits --epochs 10 --batch-size 64 \\
        --optimizer sgd --lr 0.05 --momentum 0.9 --threads 2 --seed 0 --out runs/lenet5
    python -m models.train --out runs/lenet5 --epochs 15 --resume   # continue to epoch 15

``--data`` is ``digits``, a directory of MNIST-style IDX files, or an ``.npz``
with arrays ``x``/``y``. Writes ``checkpoint.safetensors`` (every epoch,
atomically), ``metrics.json`` and ``curves.png`` to ``--out``. The shuffle
order derives from (seed, epoch) and dropout seeds from (seed, epoch, step),
so a resumed run is bit-identical to an uninterrupted one at the same thread
count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

CHECKPOINT = "checkpoint.safetensors"
MODELS = ("lenet5", "smallcnn", "mlp", "logreg")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


class UsageError(Exception):
    """A bad argument or input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="python -m models.train", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="lenet5", help=f"one of {', '.join(MODELS)} (default lenet5)")
    a("--data", default="digits", help="digits | IDX directory | file.npz (default digits)")
    a("--epochs", type=int, default=20, help="total epochs (default 20)")
    a("--batch-size", type=int, default=64, help="default 64")
    a("--optimizer", default="sgd", help=f"one of {', '.join(OPTIMIZERS)} (default sgd)")
    a("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    a("--momentum", type=float, default=0.9, help="SGD/RMSprop momentum (default 0.9)")
    a("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    a("--weight-decay", type=float, default=0.0, help="torch's weight_decay (AdamW: decoupled)")
    a("--l1", type=float, default=0.0, help="L1 penalty coefficient")
    a("--l2", type=float, default=0.0, help="L2 penalty coefficient (coupled)")
    a("--schedule", default="cosine", help="none | step | cosine (per epoch, default cosine)")
    a("--step-size", type=int, default=5, help="StepLR period in epochs (default 5)")
    a("--gamma", type=float, default=0.1, help="StepLR factor (default 0.1)")
    a("--shift", type=int, default=2,
      help="augment image batches by random translations of up to this many pixels (default 2; 0 off)")
    a("--dropout", type=float, default=0.0, help="MLP dropout probability (default 0)")
    a("--hidden", default="128", help="MLP hidden widths, comma-separated (default 128)")
    a("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    a("--seed", type=int, default=0, help="init, shuffle and dropout seed (default 0)")
    a("--eval-batch-size", type=int, default=256)
    a("--out", required=True, help="output directory")
    a("--resume", action="store_true", help=f"continue from --out/{CHECKPOINT}")
    a("--stop-after", type=int, default=None,
      help="stop after this many epochs in this invocation (resume later with --resume)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--no-plot", action="store_true", help="skip curves.png")
    return p


def check_args(args):
    if args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if args.schedule not in ("none", "step", "cosine"):
        raise UsageError(f"unknown schedule {args.schedule!r}; choose none, step or cosine")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    for name in ("momentum", "weight_decay", "l1", "l2"):
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1, got {args.stop_after}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.shift < 0:
        raise UsageError(f"--shift must be >= 0, got {args.shift}")
    for name in ("epochs", "batch_size", "eval_batch_size", "step_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.data != "digits" and not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such file or directory")
    try:
        args.hidden_sizes = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated ints, got {args.hidden!r}") from None
    if args.resume and not os.path.isfile(os.path.join(args.out, CHECKPOINT)):
        raise UsageError(f"--resume: no {CHECKPOINT} in {args.out}")


def build_model(args, ds):
    import models

    shape = ds.input_shape
    if args.model == "lenet5" and shape != (1, 28, 28):
        raise UsageError(f"lenet5 needs (1, 28, 28) images, data {args.data} has {shape}")
    if args.model == "smallcnn" and shape != (3, 32, 32):
        raise UsageError(f"smallcnn needs (3, 32, 32) images, data {args.data} has {shape}")
    features = int(np.prod(shape))
    if args.model == "lenet5":
        return models.LeNet5(ds.num_classes, seed=args.seed, input_grad=False)
    if args.model == "smallcnn":
        return models.SmallCNN(ds.num_classes, seed=args.seed, input_grad=False)
    if args.model == "mlp":
        return models.MLP(features, args.hidden_sizes, ds.num_classes, args.dropout,
                          seed=args.seed)
    return models.LogisticRegression(features, ds.num_classes, seed=args.seed)


def build_optimizer(args, params):
    import models

    reg = dict(weight_decay=args.weight_decay, l1=args.l1, l2=args.l2)
    if args.optimizer == "sgd":
        return models.SGD(params, args.lr, momentum=args.momentum, nesterov=args.nesterov, **reg)
    if args.optimizer == "rmsprop":
        return models.RMSprop(params, args.lr, momentum=args.momentum, **reg)
    cls = models.Adam if args.optimizer == "adam" else models.AdamW
    return cls(params, args.lr, **reg)


def build_scheduler(args, opt):
    import models

    if args.schedule == "step":
        return models.StepLR(opt, args.step_size, args.gamma)
    if args.schedule == "cosine":
        return models.CosineAnnealingLR(opt, args.epochs)
    return None


def evaluate(model, crit, x, y, batch_size):
    """(mean loss, accuracy) in eval mode."""
    from .data import batches

    model.eval()
    total_loss, correct = 0.0, 0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        logits = model(xb)
        total_loss += crit(logits, yb) * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
    model.train()
    return total_loss / len(y), correct / len(y)


def warm_up(model, crit, opt, x, y, n):
    """One training step on ``n`` samples so JIT compilation is not timed as training.

    Parameters, optimizer state and buffers (BatchNorm statistics) are restored and
    gradients zeroed afterwards, so the run's results do not depend on it. On an empty
    Numba cache the step runs on NumPy while two child processes compile its kernels
    (``fastkern.background``); this waits for them, so that every epoch runs on the
    kernels and a seeded run gives the same weights whether the cache was empty or not.
    """
    import fastkern

    params = [p.array.copy() for p in model.parameters()]
    opt_state = opt.state_dict()
    opt_state["state"] = [{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in s.items()}
                          for s in opt_state["state"]]
    saved = {k: v.copy() for k, v in model.named_buffers()}
    crit(model(np.ascontiguousarray(x[:n])), np.ascontiguousarray(y[:n]))
    model.backward(crit.backward())
    opt.step()
    fastkern.background.wait()
    for p, a in zip(model.parameters(), params):
        p.array[...] = a
    opt.load_state_dict(opt_state)
    model.zero_grad()
    for k, v in model.named_buffers():
        v[...] = saved[k]


def write_outputs(out, history, test_acc, test_loss, config, plot):
    from .checkpoint import atomic_write

    metrics = {"test_accuracy": test_acc, "test_loss": test_loss, "epochs": len(history),
               "history": history, "config": config}
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2).encode())
    if plot and history:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [h["epoch"] for h in history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
        a1.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
        a1.set(xlabel="epoch", ylabel="loss", title="loss")
        a2.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train")
        a2.plot(ep, [h["test_accuracy"] for h in history], "o-", label="test")
        a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "curves.png"), dpi=100)
        plt.close(fig)


def run(args) -> dict:
    import fastkern
    import models
    from tqdm import tqdm

    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import DataError, batches, load, random_shift_
    from .memory import reuse_freed_memory

    check_args(args)
    reuse_freed_memory()
    if args.threads is not None:
        try:
            fastkern.set_num_threads(args.threads)
        except ValueError as e:
            raise UsageError(f"--threads: {e}") from None
    try:
        ds = load(args.data, seed=args.seed)
    except DataError as e:
        raise UsageError(str(e)) from None
    model = build_model(args, ds)
    crit = models.CrossEntropyLoss()
    opt = build_optimizer(args, list(model.parameters()))
    sched = build_scheduler(args, opt)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, CHECKPOINT)
    config = {k: getattr(args, k) for k in ("model", "data", "batch_size", "optimizer", "lr",
                                            "momentum", "nesterov", "weight_decay", "l1", "l2",
                                            "schedule", "shift", "hidden", "dropout", "seed",
                                            "epochs")}
    config["threads"] = fastkern.get_num_threads()
    start, history = 0, []
    if args.resume:
        try:
            meta = load_checkpoint(ckpt, model, opt, sched)
        except (ValueError, KeyError) as e:
            raise UsageError(f"--resume: {e}") from None
        saved = meta.get("config", {})
        for k in ("model", "optimizer", "batch_size", "seed", "schedule", "hidden", "dropout",
                  "shift"):
            if k in saved and saved[k] != config[k]:
                raise UsageError(f"--resume: checkpoint has {k}={saved[k]!r}, "
                                 f"command line has {config[k]!r}")
        start, history = int(meta["epoch"]), list(meta.get("history", []))
        print(f"resumed from {ckpt} after epoch {start}", file=sys.stderr)

    log = sys.stderr
    n_train = len(ds.y_train)
    steps = n_train // args.batch_size + (n_train % args.batch_size > 0)
    print(f"{args.model} ({model.num_parameters():,} parameters) on {ds.name}: "
          f"{n_train} train / {len(ds.y_test)} test, {ds.input_shape}, "
          f"{ds.num_classes} classes, {config['threads']} threads", file=log)
    shift = args.shift if ds.x_train.ndim == 4 else 0
    scratch = np.empty((args.batch_size,) + ds.input_shape, np.float32) if shift else None
    has_dropout = any(isinstance(m, models.Dropout) for m in model.modules())
    print("preparing kernels (compiled on the first run, then loaded from Numba's cache)", file=log)
    t0 = time.perf_counter()
    warm_up(model, crit, opt, ds.x_train, ds.y_train, args.batch_size)
    print(f"kernels ready in {time.perf_counter() - t0:.2f} s", file=log)
    test_loss, test_acc = float("nan"), float("nan")
    if history:
        test_loss, test_acc = history[-1]["test_loss"], history[-1]["test_accuracy"]
    end = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    for epoch in range(start, end):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", leave=False,
                   disable=args.no_progress, file=log, dynamic_ncols=True)
        t_epoch = time.perf_counter()
        aug_rng = np.random.default_rng([args.seed, epoch, 1])
        for step, (xb, yb) in enumerate(batches(ds.x_train, ds.y_train, args.batch_size,
                                                seed=args.seed, epoch=epoch)):
            if shift:
                random_shift_(xb, shift, ds.background, aug_rng, scratch)
            if has_dropout:
                models.reseed_dropout(model, args.seed, epoch, step)
            logits = model(xb)
            loss = crit(logits, yb)
            correct += int((logits.argmax(axis=1) == yb).sum())
            model.backward(crit.backward())
            opt.step()
            opt.zero_grad()
            seen += len(yb)
            loss_sum += loss * len(yb)
            if step % 8 == 0 or step == steps - 1:
                rate = seen / max(time.perf_counter() - t_epoch, 1e-9)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
        seconds = time.perf_counter() - t_epoch
        bar.close()
        lr = opt.lr
        if sched is not None:
            sched.step()
        test_loss, test_acc = evaluate(model, crit, ds.x_test, ds.y_test, args.eval_batch_size)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen,
                        "train_accuracy": correct / seen, "test_loss": test_loss,
                        "test_accuracy": test_acc, "images_per_s": seen / seconds,
                        "seconds": seconds, "lr": lr})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss_sum / seen:.4f}  "
              f"acc {correct / seen:.4f}  test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  "
              f"{seen / seconds:8.0f} img/s  {seconds:6.2f} s  lr {lr:.4g}", file=log)
        save_checkpoint(ckpt, model, opt, sched, epoch=epoch + 1,
                        extra={"history": history, "config": config})
    train_seconds = sum(h["seconds"] for h in history)
    print(f"test accuracy {test_acc:.4f} after {len(history)} epochs "
          f"({train_seconds:.1f} s of training)", file=log)
    write_outputs(args.out, history, test_acc, test_loss, config, not args.no_plot)
    return {"test_accuracy": test_acc, "history": history}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        run(args)
    except UsageError as e:
        print(f"models.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("models.train: interrupted (the last finished epoch is checkpointed)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

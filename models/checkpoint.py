"""Checkpoints in safetensors, written atomically, read without pickle.

Layout of ``checkpoint.safetensors``:

* the model's ``state_dict`` under its own names ("0.weight", "1.running_mean", ...);
* optimizer state arrays under ``optimizer.state.<i>.<name>`` (e.g. ``exp_avg``);
* metadata strings (JSON): ``optimizer`` (type, lr, hyper-parameters, step
  counts), ``scheduler``, ``epoch`` and any ``extra`` entries the caller adds.

``safetensors.numpy.load_file(path)`` gives every array back; ``load_checkpoint``
also restores the model, optimizer and scheduler.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

_OPT = "optimizer.state."


def _contiguous(a):
    # np.ascontiguousarray would turn a 0-d buffer (num_batches_tracked) into shape (1,).
    return a if a.flags.c_contiguous else a.copy(order="C")


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_checkpoint(path, model, optimizer=None, scheduler=None, epoch=0, extra=None) -> None:
    """Save model (+ optimizer, scheduler, epoch, JSON-able ``extra``) to ``path`` atomically."""
    from safetensors.numpy import save

    tensors = {k: _contiguous(np.asarray(v)) for k, v in model.state_dict().items()}
    meta = {"format": "fastkern-checkpoint-1", "epoch": json.dumps(int(epoch))}
    if optimizer is not None:
        sd = optimizer.state_dict()
        steps = []
        for i, st in enumerate(sd["state"]):
            steps.append(int(st["step"]))
            for name, arr in st.items():
                if name != "step":
                    tensors[f"{_OPT}{i}.{name}"] = _contiguous(np.asarray(arr))
        opt_meta = {k: v for k, v in sd.items() if k != "state"}
        opt_meta["steps"] = steps
        meta["optimizer"] = json.dumps(opt_meta)
    if scheduler is not None:
        meta["scheduler"] = json.dumps(scheduler.state_dict())
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    atomic_write(path, save(tensors, metadata=meta))


def read_checkpoint(path):
    """``(tensors, metadata)`` with metadata values JSON-decoded. Raises ValueError if unreadable."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
        with safe_open(path, framework="numpy") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if raw.get("format") != "fastkern-checkpoint-1":
        raise ValueError(f"{path}: not a fastkern checkpoint (metadata format={raw.get('format')!r})")
    meta = {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}
    return tensors, meta


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> dict:
    """Restore model (+ optimizer, scheduler) from ``path``; return the metadata (epoch, extras)."""
    tensors, meta = read_checkpoint(path)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_OPT)})
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"{path}: has no optimizer state")
        om = meta["optimizer"]
        state = [{"step": s} for s in om.pop("steps")]
        for k, v in tensors.items():
            if k.startswith(_OPT):
                i, name = k[len(_OPT):].split(".", 1)
                state[int(i)][name] = v
        optimizer.load_state_dict({**om, "state": state})
    if scheduler is not None:
        if "scheduler" not in meta:
            raise ValueError(f"{path}: has no scheduler state")
        scheduler.load_state_dict(meta["scheduler"])
    return meta

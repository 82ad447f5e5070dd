"""Datasets and the batch iterator.

* ``load_digits()``: scikit-learn's bundled 8x8 digits (offline), stratified
  seeded split, bilinearly resized to 28x28 for LeNet5, scaled to [0, 1] and
  normalized with the training set's mean and std.
* ``load_idx_dir(path)``: MNIST / Fashion-MNIST IDX files (raw or ``.gz``).
* ``load_npz(path)``: arrays ``x`` and ``y`` (optionally ``x_test``/``y_test``).
* ``batches(...)``: seeded shuffling into one reused batch buffer.
* ``random_shift_(...)``: in-place random translation of a batch of images.

Every loader returns a :class:`Dataset` of float32 NCHW (or (N, F)) images
and int64 labels. Malformed files raise :class:`DataError` naming the file.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """A data file is missing, truncated or malformed."""


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = ""
    background: float = 0.0  # the normalized value of a 0 pixel (fill for shifted images)

    @property
    def input_shape(self):
        return self.x_train.shape[1:]


# ------------------------------------------------------------------ helpers

def stratified_split(y, test_fraction, seed):
    """Indices (train, test): each class split ``test_fraction`` to test, shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def resize_bilinear(images, size):
    """Resize (N, H, W) images to (N, size, size), align_corners=False like torch's bilinear."""
    n, h, w = images.shape

    def axis(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, size)
    x0, x1, fx = axis(w, size)
    rows = images[:, y0, :] * (1 - fy)[None, :, None] + images[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def normalize(x_train, x_test):
    """Standardize both with the training set's scalar mean and std; also return where 0 lands."""
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return (((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32),
            -mean / std)


def _finish(x, y, x_test, y_test, name):
    x, x_test, background = normalize(x, x_test)
    y, y_test = y.astype(np.int64), y_test.astype(np.int64)
    num_classes = int(max(y.max(), y_test.max() if y_test.size else 0)) + 1
    return Dataset(np.ascontiguousarray(x), y, np.ascontiguousarray(x_test), y_test, num_classes,
                   name, background)


# ------------------------------------------------------------------ digits

def load_digits(size=28, test_fraction=0.2, seed=0) -> Dataset:
    """sklearn's 1797 8x8 digits as (N, 1, size, size) float32; stratified split by ``seed``."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    images = d.images.astype(np.float32) / 16.0
    if size != 8:
        images = resize_bilinear(images, size)
    x = images[:, None, :, :]
    tr, te = stratified_split(d.target, test_fraction, seed)
    return _finish(x[tr], d.target[tr], x[te], d.target[te], "digits")


# ------------------------------------------------------------------ IDX (MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """One IDX file (raw or gzipped): validates the magic, the dims and the payload length."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as e:  # includes gzip's BadGzipFile and truncated streams (EOFError below)
        raise DataError(f"{path}: cannot read: {e}") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()} (expected 0000<type><ndim>)")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, need {head})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    want = head + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != want:
        raise DataError(f"{path}: {len(raw)} bytes but dims {dims} of {dtype} need {want}"
                        f" ({'truncated' if len(raw) < want else 'trailing data'})")
    return np.frombuffer(raw, dtype, offset=head).reshape(dims)


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise DataError(f"{directory}: no {stem} or {stem}.gz")


def load_idx_dir(directory) -> Dataset:
    """MNIST/Fashion-MNIST: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory")
    parts = {}
    for split in ("train", "t10k"):
        ip = _find(directory, f"{split}-images-idx3-ubyte")
        lp = _find(directory, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(ip), read_idx(lp)
        if images.ndim != 3:
            raise DataError(f"{ip}: images must be 3-D (N, rows, cols), got dims {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{lp}: labels must be 1-D, got dims {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{ip} has {len(images)} images but {lp} has {len(labels)} labels")
        parts[split] = (images.astype(np.float32)[:, None] / 255.0, labels)
    if parts["train"][0].shape[1:] != parts["t10k"][0].shape[1:]:
        raise DataError(f"{directory}: train and test images differ in size")
    (x, y), (xt, yt) = parts["train"], parts["t10k"]
    return _finish(x, y, xt, yt, os.path.basename(os.path.normpath(directory)))


# ------------------------------------------------------------------ npz

def load_npz(path, test_fraction=0.2, seed=0) -> Dataset:
    """Arrays ``x`` (N, ...) and integer ``y`` (N,); ``x_test``/``y_test`` if present, else a split.

    Images (N, H, W) get a channel axis; uint8 data is scaled to [0, 1]. No pickle.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # zipfile.BadZipFile, ValueError for object arrays, truncation
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    for k in ("x", "y"):
        if k not in arrays:
            raise DataError(f"{path}: missing array {k!r} (has {sorted(arrays)})")

    def prep(x, y, kx, ky):
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise DataError(f"{path}: {ky} must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{path}: {kx} has {len(x)} samples but {ky} has {len(y)}")
        if not (np.issubdtype(x.dtype, np.number) and x.ndim >= 2):
            raise DataError(f"{path}: {kx} must be a numeric (N, ...) array, got {x.dtype} {x.shape}")
        if y.size and y.min() < 0:
            raise DataError(f"{path}: {ky} has negative labels")
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        return (x[:, None] if x.ndim == 3 else x), y

    x, y = prep(arrays["x"], arrays["y"], "x", "y")
    if "x_test" in arrays and "y_test" in arrays:
        xt, yt = prep(arrays["x_test"], arrays["y_test"], "x_test", "y_test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test samples {xt.shape[1:]} differ from x's {x.shape[1:]}")
    else:
        tr, te = stratified_split(y, test_fraction, seed)
        x, y, xt, yt = x[tr], y[tr], x[te], y[te]
    return _finish(x, y, xt, yt, os.path.basename(path))


def load(spec, seed=0) -> Dataset:
    """``"digits"``, a directory of IDX files, or a ``.npz`` path."""
    if spec == "digits":
        return load_digits(seed=seed)
    if os.path.isdir(spec):
        return load_idx_dir(spec)
    if spec.endswith(".npz"):
        return load_npz(spec, seed=seed)
    raise DataError(f"{spec}: expected 'digits', a directory of IDX files or a .npz file")


# ------------------------------------------------------------------ batches

def batches(x, y, batch_size, *, shuffle=True, seed=0, epoch=0, drop_last=False):
    """Yield ``(xb, yb)`` batches gathered into ONE reused buffer pair.

    The order is a permutation drawn from ``default_rng([seed, epoch])``, so
    any epoch's order can be recomputed (resuming needs that). Each yielded
    batch is overwritten by the next one: copy it if you keep it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    bx = np.empty((min(batch_size, n),) + x.shape[1:], x.dtype)
    by = np.empty(min(batch_size, n), y.dtype)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < batch_size and drop_last:
            break
        k = len(idx)
        np.take(x, idx, axis=0, out=bx[:k])
        np.take(y, idx, axis=0, out=by[:k])
        yield bx[:k], by[:k]


def random_shift_(images, max_shift, fill, rng, scratch=None):
    """Translate each (C, H, W) image of ``images`` in place by up to ``max_shift`` pixels.

    Uncovered pixels get ``fill`` (the background value). Offsets come from
    ``rng``; ``scratch`` (same shape) avoids allocating a copy per call.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    if scratch is None:
        src = images.copy()
    else:
        src = scratch[:n]
        np.copyto(src, images)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    images.fill(fill)
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        images[i, :, yd, xd] = src[i, :, ys, xs]
    return images

"""Data loaders (digits, IDX, npz) and the batch iterator."""
import gzip
import struct

import numpy as np
import pytest

from models import data


def _idx_bytes(arr, type_code=0x08):
    head = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(">u1" if type_code == 0x08 else arr.dtype).tobytes()


def _write_mnist(tmp_path, n_train=20, n_test=10, gz=False, size=28):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        files[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        files[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for name, arr in files.items():
        raw = _idx_bytes(arr)
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (tmp_path / name).write_bytes(raw)
    return files


def test_digits_split_is_stratified_seeded_and_normalized():
    ds = data.load_digits(seed=0)
    assert ds.x_train.shape[1:] == (1, 28, 28) and ds.x_train.dtype == np.float32
    assert len(ds.y_train) + len(ds.y_test) == 1797 and ds.num_classes == 10
    counts_tr, counts_te = np.bincount(ds.y_train), np.bincount(ds.y_test)
    np.testing.assert_allclose(counts_te / (counts_tr + counts_te), 0.2, atol=0.02)
    assert abs(ds.x_train.mean()) < 1e-3 and abs(ds.x_train.std() - 1) < 1e-3
    again, other = data.load_digits(seed=0), data.load_digits(seed=1)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    assert not np.array_equal(ds.y_test, other.y_test)


def test_bilinear_resize_matches_torch():
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    ours = data.resize_bilinear(img, 28)
    ref = torch.nn.functional.interpolate(torch.tensor(img)[:, None], size=(28, 28),
                                          mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_round_trip(tmp_path, gz):
    files = _write_mnist(tmp_path, gz=gz)
    ds = data.load_idx_dir(str(tmp_path))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train, files["train-labels-idx1-ubyte"])
    # Normalization is affine, so the order of pixel values is preserved.
    raw = files["train-images-idx3-ubyte"].astype(np.float64).ravel()
    np.testing.assert_allclose(np.corrcoef(raw, ds.x_train.ravel())[0, 1], 1.0, atol=1e-6)


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\0", "trailing data"),
    (lambda b: b"\x12\x34" + b[2:], "bad IDX magic"),
    (lambda b: b[:6], "truncated header"),
    (lambda b: b[:2], "too short"),
])
def test_malformed_idx_files_name_the_file_and_problem(tmp_path, corrupt, message):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(data.DataError, match=message) as e:
        data.load_idx_dir(str(tmp_path))
    assert "train-images-idx3-ubyte" in str(e.value)


def test_truncated_gzip_and_mismatched_lengths(tmp_path):
    _write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(data.DataError, match="t10k-images.*gzip"):
        data.load_idx_dir(str(tmp_path))
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(data.DataError, match="10 images but .* 9 labels"):
        data.load_idx_dir(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="no t10k-labels-idx1-ubyte"):
        data.load_idx_dir(str(tmp_path))


def test_npz_loader_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), np.arange(50) % 5
    good = tmp_path / "d.npz"
    np.savez(good, x=x, y=y)
    ds = data.load_npz(str(good))
    assert ds.x_train.shape[1:] == (1, 28, 28) and len(ds.y_test) == 10 and ds.num_classes == 5
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(data.DataError, match="nolabels.npz: missing array 'y'"):
        data.load_npz(str(tmp_path / "nolabels.npz"))
    np.savez(tmp_path / "short.npz", x=x, y=y[:-1])
    with pytest.raises(data.DataError, match="50 samples but y has 49"):
        data.load_npz(str(tmp_path / "short.npz"))
    np.savez(tmp_path / "obj.npz", x=x, y=np.array([object()] * 50))
    with pytest.raises(data.DataError, match="obj.npz"):
        data.load_npz(str(tmp_path / "obj.npz"))
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="trunc.npz: not a readable .npz"):
        data.load_npz(str(trunc))


def test_batches_cover_every_sample_once_in_a_seeded_order():
    x = np.arange(23, dtype=np.float32).reshape(23, 1)
    y = np.arange(23)
    seen, buffers = [], set()
    for xb, yb in data.batches(x, y, 5, seed=3, epoch=2):
        np.testing.assert_array_equal(xb[:, 0], yb)
        seen.extend(yb.tolist())
        buffers.add(xb.__array_interface__["data"][0])
    assert sorted(seen) == list(range(23)) and len(buffers) == 1  # one reused buffer
    again = [yb.copy() for _, yb in data.batches(x, y, 5, seed=3, epoch=2)]
    assert np.concatenate(again).tolist() == seen
    other = np.concatenate([yb.copy() for _, yb in data.batches(x, y, 5, seed=3, epoch=3)])
    assert other.tolist() != seen
    sizes = [len(yb) for _, yb in data.batches(x, y, 5, drop_last=True)]
    assert sizes == [5, 5, 5, 5]

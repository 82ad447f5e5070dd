"""Background compilation: the first step on NumPy, its calls recorded and replayed in children."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastkern as fk
import models
from fastkern import background
from models import module as model_module


@pytest.fixture
def cold(monkeypatch):
    """A process whose kernels count as not yet compiled, with background compiles on."""
    monkeypatch.setenv("FASTKERN_BACKGROUND_COMPILE", "1")
    monkeypatch.setattr(background, "kernels_cached", lambda dtype: False)
    monkeypatch.setattr(background, "_recording", None)
    monkeypatch.setattr(background, "_children", [])
    monkeypatch.setattr(model_module, "_root", None)
    yield
    background.wait()


class FakeChild:
    """Stands in for a compiling child: keeps the calls it was sent, exits when told."""
    started = []

    def __init__(self, argv, **kwargs):
        self.argv, self.running, self.sent = argv, True, b""
        self.stdin = self
        FakeChild.started.append(self)

    def write(self, data):
        self.sent += data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def poll(self):
        return None if self.running else 0

    def wait(self, timeout=None):
        self.running = False

    def calls(self):
        return json.loads(self.sent)


def test_an_argument_survives_the_trip_through_json():
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for a in (base, base.transpose(2, 0, 1), base[:, ::2, 1:], np.zeros((2, 0, 3)), np.arange(3)):
        b = background._value(json.loads(json.dumps(background._spec(a))))
        assert (b.dtype, b.shape) == (a.dtype, a.shape)
        assert b.strides == a.strides
        assert not b.any()
    assert background._value(json.loads(json.dumps(background._spec((1, (2, 3)))))) == (1, (2, 3))
    assert background._spec(np.float32(0.5)) == 0.5


def test_while_recording_the_ops_run_on_numpy_and_are_logged(cold, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    FakeChild.started = []
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    assert background.start_recording(np.float32)
    assert background.compiling()
    y = fk.conv2d(x, w, stride=(2, 1), padding=1)
    np.testing.assert_allclose(y, fk.conv.conv2d(x, w, stride=(2, 1), padding=1), rtol=1e-4, atol=1e-4)
    fk.relu(y, out=y)
    assert [c[0] for c in background._recording] == ["conv2d", "relu"]
    assert background.compile_recorded()
    conv_child, rest_child = FakeChild.started
    assert conv_child.calls()[0][0] == "conv2d" and rest_child.calls()[0][0] == "relu"
    assert conv_child.calls()[0][2]["stride"] == {"tuple": [2, 1]}
    assert background.compiling()  # the NumPy versions stand in until the children exit
    fk.relu(y)
    conv_child.wait()
    rest_child.wait()
    assert not background.compiling()


def test_a_models_training_step_records_and_the_optimizer_step_starts_the_compile(cold, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    FakeChild.started = []
    model = models.LeNet5(seed=0)
    crit = models.CrossEntropyLoss()
    opt = models.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    crit(model(x), np.arange(4))
    model.backward(crit.backward())
    assert background._recording is not None and not FakeChild.started
    opt.step()
    names = [c[0] for child in FakeChild.started for c in child.calls()]
    assert {"conv2d", "conv2d_backward", "linear", "linear_backward", "softmax_cross_entropy",
            "sgd_update_foreach"} <= set(names)
    assert background._recording is None


def test_the_first_step_on_numpy_gives_the_kernels_gradients(cold, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    labels = np.arange(8) % 10
    grads = []
    for record in (True, False):
        monkeypatch.setattr(model_module, "_root", None)
        monkeypatch.setattr(background, "kernels_cached", lambda dtype, r=record: not r)
        model, crit = models.LeNet5(seed=3), models.CrossEntropyLoss()
        loss = crit(model(x), labels)
        model.backward(crit.backward())
        assert (background._recording is not None) == record
        background._recording = None
        grads.append((loss, [p.grad.copy() for p in model.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_a_child_replays_the_calls_into_the_numba_cache(tmp_path):
    calls = [("relu", [background._spec(np.ones((3, 5), np.float64))], {}),
             ("sgd_update_foreach", [background._spec([np.ones(7, np.float64)]),
                                     background._spec([np.ones(7, np.float64)])], {"lr": 0.1})]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "from fastkern import background; background._replay()"],
                       input=json.dumps(calls), text=True, env=env, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    index = {p.name for p in tmp_path.rglob("*.nbi")}
    assert any(n.startswith("activations._relu_span") for n in index), index
    assert any(n.startswith("optim._sgd_serial") for n in index), index


def test_nothing_starts_when_turned_off_or_already_compiled(monkeypatch):
    monkeypatch.setattr(background, "_recording", None)
    monkeypatch.setenv("FASTKERN_BACKGROUND_COMPILE", "0")
    assert not background.start_recording(np.float32)
    monkeypatch.setenv("FASTKERN_BACKGROUND_COMPILE", "1")
    monkeypatch.setattr(background, "kernels_cached", lambda dtype: True)
    assert not background.start_recording(np.float32)
    assert not background.compiling()


@pytest.mark.skipif(background.fcntl is None, reason="no fcntl (not POSIX)")
def test_a_numba_cache_save_waits_for_another_process_saving(tmp_path):
    import threading

    from numba.core import caching
    assert getattr(caching.IndexDataCacheFile.save, "fastkern_locked", False)
    cache_file = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", "stamp")
    with background._flock(os.path.join(tmp_path, ".fastkern-save.lock")):
        saver = threading.Thread(target=cache_file.save, args=("key", b"code"))
        saver.start()
        saver.join(0.5)
        assert saver.is_alive() and not list(tmp_path.glob("*.nbi"))
    saver.join(10)
    assert not saver.is_alive()
    assert cache_file.load("key") == b"code"


def test_calls_whose_arguments_json_cannot_hold_are_left_to_compile_here(cold, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    FakeChild.started = []
    background.start_recording(np.float32)
    call = ("relu", [background._spec(np.ones(3))], {})
    background._recording += [call, ("relu", [object()], {}), call]
    assert background.compile_recorded()
    (child,) = FakeChild.started  # no conv calls: one child, sent the one call once
    assert child.calls() == json.loads(json.dumps([call]))


def test_a_replayed_pooled_conv_backward_gets_indices_its_kernel_accepts():
    x, w = np.zeros((2, 3, 11, 9), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    pooled, idx = fk.conv2d(x, w, padding=1, max_pool=2)
    kwargs = dict(activation="relu", output=pooled, pool_indices=np.zeros_like(idx))
    with pytest.raises(ValueError, match="outside"):
        fk.conv2d_backward(np.zeros_like(pooled), x, w, 1, 1, **kwargs)
    kwargs["pool_indices"] = background._window_corners(fk.conv2d_backward, (np.zeros_like(pooled), x, w, 1, 1),
                                                        kwargs)
    assert kwargs["pool_indices"][0, 0, 1, 2] == 2 * 9 + 4  # window (1, 2) of the 11 x 9 output
    fk.conv2d_backward(np.zeros_like(pooled), x, w, 1, 1, **kwargs)



def test_the_kernels_count_as_cached_once_compiled_and_saved():
    x, w = np.ones((1, 2, 5, 5), np.float32), np.ones((2, 2, 3, 3), np.float32)
    fk.conv.conv2d_backward(fk.conv.conv2d(x, w), x, w)  # compiled, or loaded from the cache
    fk.matmul(np.ones((64, 300), np.float32), np.ones((300, 64), np.float32))
    assert background.kernels_cached(np.float32)
    assert not background.kernels_cached(np.float16)  # never compiled for it

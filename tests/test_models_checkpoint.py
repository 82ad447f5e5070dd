"""Checkpoints: safetensors round trip of model + optimizer + scheduler, atomic writes, no pickle."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import models
from models.checkpoint import atomic_write, read_checkpoint


def _trained_state(seed=0):
    model = models.Sequential(models.Conv2d(1, 2, 3), models.BatchNorm2d(2), models.Flatten(),
                              models.Linear(8, 3))
    models.manual_seed(seed)
    opt = models.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    sched = models.StepLR(opt, 2, 0.5)
    rng = np.random.default_rng(seed)
    model[1].running_mean[...] = rng.standard_normal(2)
    model[1].num_batches_tracked[...] = 7
    for _ in range(3):
        for p in model.parameters():
            p.grad[...] = rng.standard_normal(p.shape)
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_and_scheduler(tmp_path):
    model, opt, sched = _trained_state()
    path = tmp_path / "ckpt.safetensors"
    models.save_checkpoint(str(path), model, opt, sched, epoch=3, extra={"note": [1, 2]})
    fresh = models.Sequential(models.Conv2d(1, 2, 3, seed=5), models.BatchNorm2d(2),
                              models.Flatten(), models.Linear(8, 3, seed=5))
    opt2 = models.Adam(fresh.parameters(), lr=1.0)
    sched2 = models.StepLR(opt2, 2, 0.5)
    meta = models.load_checkpoint(str(path), fresh, opt2, sched2)
    assert meta["epoch"] == 3 and meta["note"] == [1, 2]
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    assert int(fresh[1].num_batches_tracked) == 7
    assert opt2.lr == opt.lr and sched2.last_epoch == sched.last_epoch
    for s, t in zip(opt.state, opt2.state):
        assert s.keys() == t.keys() and s["step"] == t["step"] == 3
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            np.testing.assert_array_equal(s[k], t[k])


def test_file_is_plain_safetensors_under_the_model_names(tmp_path):
    model, opt, _ = _trained_state()
    path = tmp_path / "c.safetensors"
    models.save_checkpoint(str(path), model, opt, epoch=1)
    tensors = load_file(str(path))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(tensors[k], v)
    assert "optimizer.state.0.exp_avg" in tensors
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # a JSON header, no pickle anywhere
    assert json.loads(header["__metadata__"]["optimizer"])["type"] == "Adam"


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(str(path), b"old")
    atomic_write(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]

    with pytest.raises(TypeError):
        atomic_write(str(path), object())  # a failed write keeps the old file, no temp left
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_corrupt_or_foreign_files_raise_clear_errors(tmp_path):
    model, opt, _ = _trained_state()
    path = tmp_path / "c.safetensors"
    models.save_checkpoint(str(path), model, opt)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        read_checkpoint(str(path))
    from safetensors.numpy import save_file
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastkern checkpoint"):
        read_checkpoint(str(tmp_path / "other.safetensors"))
    models.save_checkpoint(str(path), model, opt)
    with pytest.raises(KeyError, match="missing"):
        models.load_checkpoint(str(path), models.Sequential(models.Linear(8, 3)))

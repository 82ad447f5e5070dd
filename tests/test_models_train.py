"""The training loop and CLI: accuracy on digits, bit-identical resume, outputs, argument errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from models.train import build_parser, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv):
    return run(build_parser().parse_args([*argv, "--no-progress", "--no-plot"]))


def test_short_digits_run_reaches_sane_accuracy(tmp_path):
    result = _run("--model", "mlp", "--hidden", "64", "--epochs", "3", "--batch-size", "32",
                  "--out", str(tmp_path))
    assert result["test_accuracy"] >= 0.9
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """200 28x28 images of 4 classes that differ in where their bright square sits."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    x = rng.integers(0, 60, (200, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 4 + 12 * r:12 + 12 * r, 4 + 12 * q:12 + 12 * q] += 150
    path = tmp_path_factory.mktemp("data") / "squares.npz"
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.mark.parametrize("argv", [
    ("--model", "lenet5", "--optimizer", "adam", "--lr", "1e-3"),
    ("--model", "mlp", "--dropout", "0.3", "--schedule", "step", "--step-size", "1"),
])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, small_npz, argv):
    common = ("--data", small_npz, "--epochs", "3", "--batch-size", "48", "--threads", "1", *argv)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _run(*common, "--out", full)
    _run(*common, "--out", part, "--stop-after", "1")
    assert json.load(open(os.path.join(part, "metrics.json")))["epochs"] == 1
    _run(*common, "--out", part, "--resume")
    a = load_file(os.path.join(full, "checkpoint.safetensors"))
    b = load_file(os.path.join(part, "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ha = json.load(open(os.path.join(full, "metrics.json")))["history"]
    hb = json.load(open(os.path.join(part, "metrics.json")))["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def _cli(*argv):
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "models.train", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_checkpoint_metrics_and_curves(tmp_path):
    out = tmp_path / "run"
    r = _cli("--model", "logreg", "--epochs", "1", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "curves.png", "metrics.json"]
    m = json.load(open(out / "metrics.json"))
    assert 0.0 <= m["test_accuracy"] <= 1.0 and len(m["history"]) == 1
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_s",
            "seconds"} <= m["history"][0].keys()
    assert "test accuracy" in r.stderr
    assert "1.weight" in load_file(str(out / "checkpoint.safetensors"))


@pytest.mark.parametrize("argv, message", [
    (("--model", "resnet"), "unknown model"),
    (("--lr", "0"), "--lr must be > 0"),
    (("--data", "/no/such/dir"), "no such file"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--resume",), "no checkpoint.safetensors"),
    (("--batch-size", "x"), "invalid int value"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, argv, message):
    r = _cli(*argv, "--out", str(tmp_path / "bad"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_the_warm_up_step_leaves_weights_optimizer_and_statistics_as_they_were(opt_name):
    import models
    from models.train import warm_up
    model = models.Sequential(models.Conv2d(1, 4, 3, activation="relu"), models.BatchNorm2d(4), models.Flatten(),
                              models.Linear(4 * 6 * 6, 3))
    opt = models.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd" \
        else models.Adam(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 1, 8, 8)).astype(np.float32), np.arange(5) % 3
    before = {k: v.copy() for k, v in model.state_dict().items()}
    warm_up(model, models.CrossEntropyLoss(), opt, x, y, 4)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert all(s == {"step": 0} for s in opt.state)
    assert all(not p.grad.any() for p in model.parameters())

"""Testing helpers: finite-difference gradient checks for fastkern's backward passes."""
from __future__ import annotations

import numpy as np


def numerical_grad(f, inputs, grad_output, index, eps=1e-6):
    """Central-difference gradient of ``sum(grad_output * f(*inputs))`` w.r.t. ``inputs[index]``."""
    x = inputs[index]
    grad = np.zeros_like(x, dtype=np.float64)
    flat_x = x.reshape(-1)  # a view: inputs are made contiguous by gradcheck
    flat_g = grad.reshape(-1)
    for i in range(flat_x.size):
        orig = flat_x[i]
        flat_x[i] = orig + eps
        plus = np.sum(grad_output * f(*inputs))
        flat_x[i] = orig - eps
        minus = np.sum(grad_output * f(*inputs))
        flat_x[i] = orig
        flat_g[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(f, inputs, backward, *, wrt=None, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0):
    """Check an op's analytic backward against float64 central finite differences.

    ``f(*inputs)`` returns the output array; ``backward(grad_output, *inputs)``
    returns the gradients w.r.t. the inputs as a sequence aligned with
    ``inputs`` (``None`` for inputs it does not differentiate). The check uses
    a random ``grad_output``, so every output element is weighted differently.
    ``wrt`` selects which input indices to check (default: every input whose
    analytic gradient is not None).

    Inputs are copied to contiguous float64. Returns True, or raises
    AssertionError naming the input, the worst element and both values.
    """
    inputs = [np.array(x, dtype=np.float64, order="C", copy=True) for x in inputs]
    rng = np.random.default_rng(seed)
    y = np.asarray(f(*inputs))
    grad_output = rng.standard_normal(y.shape)
    analytic = backward(grad_output, *inputs)
    if not isinstance(analytic, (tuple, list)):
        analytic = (analytic,)
    if len(analytic) != len(inputs):
        raise ValueError(f"backward returned {len(analytic)} gradients for {len(inputs)} inputs")
    indices = range(len(inputs)) if wrt is None else wrt
    for i in indices:
        if analytic[i] is None:
            if wrt is not None:
                raise AssertionError(f"backward returned None for input {i}, which wrt names")
            continue
        a = np.asarray(analytic[i], dtype=np.float64)
        if a.shape != inputs[i].shape:
            raise AssertionError(f"gradient {i} has shape {a.shape}, input has {inputs[i].shape}")
        n = numerical_grad(f, inputs, grad_output, i, eps)
        err = np.abs(a - n) - (atol + rtol * np.abs(n))
        if a.size and err.max() > 0:
            k = np.unravel_index(int(np.argmax(err)), a.shape)
            raise AssertionError(
                f"gradient of input {i} differs from finite differences at {k}: "
                f"analytic {a[k]!r}, numerical {n[k]!r} (atol={atol}, rtol={rtol})"
            )
    return True

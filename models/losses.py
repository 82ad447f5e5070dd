"""Losses: ``crit(input, target)`` returns a Python float; ``crit.backward()`` the input's gradient.

Each wraps one fused fastkern op that computes the loss and its gradient in a
single pass; ``backward(grad_output=1.0)`` scales that cached gradient.
"""
from __future__ import annotations

import fastkern as fk

from .module import Module


class _Loss(Module):
    op = None

    def __init__(self, reduction="mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' for a module loss, got {reduction!r}")
        self.reduction = reduction
        self._grad = None

    def __call__(self, input, target):
        return self.forward(input, target)

    def forward(self, input, target):
        loss, self._grad = type(self).op(input, target, reduction=self.reduction)
        return float(loss)

    def backward(self, grad_output=1.0):
        """Gradient of the last loss w.r.t. its input (times ``grad_output``)."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before a forward")
        grad, self._grad = self._grad, None
        if grad_output != 1.0:
            grad *= grad.dtype.type(grad_output)
        return grad

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of (N, C) logits against (N,) integer labels."""
    op = staticmethod(fk.softmax_cross_entropy)


class MSELoss(_Loss):
    """Mean squared error against a target of the input's shape."""
    op = staticmethod(fk.mse_loss)


class BCEWithLogitsLoss(_Loss):
    """Sigmoid + binary cross-entropy against a {0,1} (or soft) target of the input's shape."""
    op = staticmethod(fk.binary_cross_entropy_with_logits)

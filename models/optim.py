"""Optimizers (SGD, Adam, AdamW, RMSprop) and LR schedules (StepLR, CosineAnnealingLR).

torch.optim's update formulas and defaults; each ``step()`` is one foreach call
(``fastkern.sgd_update_foreach`` etc.: the scalars checked once, then one fused
kernel per parameter), so there are no per-step temporaries. All parameters form
a single group with one ``lr``.

Regularization on every optimizer: ``weight_decay`` (torch's meaning: coupled
L2 for SGD/Adam/RMSprop, decoupled for AdamW), plus ``l1`` and ``l2`` that add
``l1*sign(p) + l2*p`` to the gradient (``l1*|p|_1 + l2/2*|p|^2`` in the loss;
both together make elastic-net).
"""
from __future__ import annotations

import math

import numpy as np

import fastkern as fk

from .module import Parameter


def _check_hyper(name, value, lo=0.0, lo_open=False, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value >= hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'})"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return float(value)


class Optimizer:
    """Holds the parameters, the hyper-parameters and per-parameter state."""

    state_names: tuple = ()

    def __init__(self, params, lr, **hyper):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"parameter {i} is a {type(p).__name__}, not a models.Parameter")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("optimizer got the same parameter twice")
        self.lr = _check_hyper("lr", lr, lo_open=True)
        self.initial_lr = self.lr
        self.hyper = hyper
        self.state = [{"step": 0} for _ in self.params]

    def zero_grad(self):
        for p in self.params:
            p.zero_grad()

    def _buffer(self, i, name):
        """The named state array of parameter ``i``, created zeroed on first use."""
        st = self.state[i]
        if name not in st:
            st[name] = np.zeros_like(self.params[i].array)
        return st[name]

    def step(self):
        for st in self.state:
            st["step"] += 1
        steps = {st["step"] for st in self.state}
        if len(steps) == 1:  # the usual case: one foreach update of every parameter
            self._update(range(len(self.params)), steps.pop())
        else:  # (a state_dict can give parameters different step counts)
            for step in sorted(steps):
                self._update([i for i, st in enumerate(self.state) if st["step"] == step], step)
        fk.background.compile_recorded()  # a no-op unless the first step ran on NumPy

    def _arrays(self, idx):
        """The parameters ``idx`` and their gradients, as the update kernels take them."""
        return [self.params[i].array for i in idx], [self.params[i].grad for i in idx]

    def _buffers(self, idx, name, needed=True):
        return [self._buffer(i, name) for i in idx] if needed else None

    def state_dict(self) -> dict:
        """``{"type", "lr", "initial_lr", "hyper", "state": [{"step": n, name: array, ...}]}``."""
        return {"type": type(self).__name__, "lr": self.lr, "initial_lr": self.initial_lr,
                "hyper": dict(self.hyper), "state": [dict(s) for s in self.state]}

    def load_state_dict(self, sd: dict):
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is for {sd.get('type')}, not {type(self).__name__}")
        if len(sd["state"]) != len(self.params):
            raise ValueError(f"state_dict has state for {len(sd['state'])} parameters, "
                             f"the optimizer has {len(self.params)}")
        self.lr, self.initial_lr = float(sd["lr"]), float(sd["initial_lr"])
        self.hyper.update(sd["hyper"])
        for i, (p, s) in enumerate(zip(self.params, sd["state"])):
            new = {"step": int(s["step"])}
            for k, v in s.items():
                if k == "step":
                    continue
                v = np.asarray(v)
                if v.shape != p.shape:
                    raise ValueError(f"state {i}.{k} has shape {v.shape}, parameter has {p.shape}")
                new[k] = np.array(v, dtype=p.dtype, order="C")
            self.state[i] = new

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in {"lr": self.lr, **self.hyper}.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, nesterov, weight_decay; plus l1/l2."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, l1=0.0, l2=0.0):
        momentum = _check_hyper("momentum", momentum)
        if nesterov and (momentum == 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, lr, momentum=momentum,
                         dampening=_check_hyper("dampening", dampening, lo=-math.inf),
                         nesterov=bool(nesterov),
                         weight_decay=_check_hyper("weight_decay", weight_decay),
                         l1=_check_hyper("l1", l1), l2=_check_hyper("l2", l2))

    def _update(self, idx, step):
        h = self.hyper
        fk.sgd_update_foreach(*self._arrays(idx), self._buffers(idx, "momentum_buffer", h["momentum"]),
                              lr=self.lr, momentum=h["momentum"], dampening=h["dampening"],
                              nesterov=h["nesterov"], weight_decay=h["weight_decay"] + h["l2"],
                              l1=h["l1"], first_step=step == 1)


class Adam(Optimizer):
    """torch.optim.Adam (coupled weight_decay, amsgrad); plus l1/l2."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, l1=0.0, l2=0.0):
        super().__init__(params, lr, beta1=_check_hyper("betas[0]", betas[0], hi=1.0),
                         beta2=_check_hyper("betas[1]", betas[1], hi=1.0),
                         eps=_check_hyper("eps", eps), weight_decay=_check_hyper(
                             "weight_decay", weight_decay), amsgrad=bool(amsgrad),
                         l1=_check_hyper("l1", l1), l2=_check_hyper("l2", l2))

    def _update(self, idx, step):
        h = self.hyper
        wd = h["weight_decay"]
        fk.adam_update_foreach(
            *self._arrays(idx), self._buffers(idx, "exp_avg"), self._buffers(idx, "exp_avg_sq"),
            self._buffers(idx, "max_exp_avg_sq", h["amsgrad"]),
            step=step, lr=self.lr, beta1=h["beta1"], beta2=h["beta2"],
            eps=h["eps"], weight_decay=h["l2"] + (0.0 if self.decoupled else wd),
            decoupled_weight_decay=wd if self.decoupled else 0.0, l1=h["l1"],
            amsgrad=h["amsgrad"])


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, l1=0.0, l2=0.0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, l1, l2)


class RMSprop(Optimizer):
    """torch.optim.RMSprop: alpha, eps, weight_decay, momentum, centered; plus l1/l2."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, l1=0.0, l2=0.0):
        super().__init__(params, lr, alpha=_check_hyper("alpha", alpha, hi=1.0 + 1e-12),
                         eps=_check_hyper("eps", eps),
                         weight_decay=_check_hyper("weight_decay", weight_decay),
                         momentum=_check_hyper("momentum", momentum), centered=bool(centered),
                         l1=_check_hyper("l1", l1), l2=_check_hyper("l2", l2))

    def _update(self, idx, step):
        h = self.hyper
        fk.rmsprop_update_foreach(
            *self._arrays(idx), self._buffers(idx, "square_avg"),
            self._buffers(idx, "grad_avg", h["centered"]),
            self._buffers(idx, "momentum_buffer", h["momentum"] > 0),
            lr=self.lr, alpha=h["alpha"], eps=h["eps"], weight_decay=h["weight_decay"] + h["l2"],
            l1=h["l1"], momentum=h["momentum"], centered=h["centered"])


# ------------------------------------------------------------------ schedules

class LRScheduler:
    """Call ``step()`` once per epoch, after the optimizer steps (torch's convention)."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.initial_lr
        self.last_epoch = 0

    def step(self):
        self.last_epoch += 1
        self.optimizer.lr = self._next_lr(self.optimizer.lr)

    def get_last_lr(self):
        return [self.optimizer.lr]

    def state_dict(self):
        return {"type": type(self).__name__, "last_epoch": self.last_epoch, "base_lr": self.base_lr}

    def load_state_dict(self, sd):
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is for {sd.get('type')}, not {type(self).__name__}")
        self.last_epoch, self.base_lr = int(sd["last_epoch"]), float(sd["base_lr"])


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size must be an int >= 1, got {step_size!r}")
        super().__init__(optimizer)
        self.step_size, self.gamma = step_size, float(gamma)

    def _next_lr(self, lr):
        return lr * self.gamma if self.last_epoch % self.step_size == 0 else lr


class CosineAnnealingLR(LRScheduler):
    """Cosine from the initial lr to ``eta_min`` over ``T_max`` epochs (torch's recursive form)."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if not isinstance(T_max, int) or T_max < 1:
            raise ValueError(f"T_max must be an int >= 1, got {T_max!r}")
        super().__init__(optimizer)
        self.T_max, self.eta_min = T_max, float(eta_min)

    def _next_lr(self, lr):
        e, T, lo = self.last_epoch, self.T_max, self.eta_min
        if (e - 1 - T) % (2 * T) == 0:
            return lr + (self.base_lr - lo) * (1 - math.cos(math.pi / T)) / 2
        return (1 + math.cos(math.pi * e / T)) / (1 + math.cos(math.pi * (e - 1) / T)) * (lr - lo) + lo

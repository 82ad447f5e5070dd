"""Parameter, Module and Sequential: the model layer's skeleton.

A parameter is a NumPy array with its gradient beside it (``p.grad``). There is
no autograd tape: every module caches what its backward needs during
``forward`` and ``backward(grad_output)`` returns the gradient w.r.t. its input
while *accumulating* into its parameters' ``.grad`` (as torch does), so
``zero_grad()`` goes between steps.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np

_rng = np.random.default_rng(0)
_root, _root_runs = None, 0  # the first model run: its first step records the calls to compile (fastkern.background)


def manual_seed(seed: int) -> None:
    """Seed the generator that initializes parameters and draws dropout seeds."""
    global _rng
    _rng = np.random.default_rng(seed)


def get_rng(seed=None) -> np.random.Generator:
    """``default_rng(seed)`` for an explicit seed, else the global generator."""
    return _rng if seed is None else np.random.default_rng(seed)


def _background_compile(module, x):
    """The first model run records its ops' calls (on an empty Numba cache) and runs them on
    NumPy; an optimizer step, or else the third run of that model, starts their compile."""
    global _root, _root_runs
    import fastkern
    if _root is None:
        _root, _root_runs = module, 1
        dtype = getattr(x, "dtype", None)
        if dtype in (np.float32, np.float64):
            fastkern.background.start_recording(dtype)
    elif module is _root:
        _root_runs += 1
        if _root_runs == 3 or not fastkern.background.recording():
            fastkern.background.compile_recorded()
            _root = False


@contextlib.contextmanager
def seeded(seed):
    """Within the block, the global generator is ``default_rng(seed)`` (no-op for None)."""
    global _rng
    if seed is None:
        yield
        return
    saved, _rng = _rng, np.random.default_rng(seed)
    try:
        yield
    finally:
        _rng = saved


class Parameter(np.ndarray):
    """A trainable array: an ``ndarray`` (subclass) with ``.grad``, a zeroed array like it.

    ``p.array`` is the same memory as a plain ``ndarray``; layers hand that to
    kernels so they never see the subclass. Arithmetic on a parameter returns
    plain arrays.

    ``zero_grad()`` only marks the gradient as zero, and the first
    ``accumulate_grad(g)`` after it adopts ``g`` (a fresh array from a backward
    op) as ``.grad`` instead of adding it to zeros: a step then makes no pass
    over the gradients to clear or add them (for SmallCNN's 1M-weight layer,
    three passes over 4 MiB). Reading ``.grad`` while it is marked zero fills
    it with zeros first, so it always reads as the accumulated sum.
    """

    def __new__(cls, data, dtype=None):
        arr = np.array(data, dtype=dtype or np.asarray(data).dtype, order="C", copy=True)
        if arr.dtype not in (np.float32, np.float64):
            raise TypeError(f"a Parameter must be float32 or float64, got {arr.dtype}")
        self = arr.view(cls)
        self.array = arr
        self._grad = np.zeros_like(arr)
        self._grad_zero = False  # True: _grad is stale and stands for zeros
        return self

    def __array_finalize__(self, obj):
        # Views and copies of a parameter are not parameters of any module.
        self.array = None
        self._grad = None
        self._grad_zero = False

    @property
    def grad(self):
        if self._grad_zero:
            self._grad.fill(0)
            self._grad_zero = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad, self._grad_zero = value, False

    def zero_grad(self):
        """Mark the gradient zero (filled lazily, or replaced by the next accumulate_grad)."""
        if self._grad is not None:
            self._grad_zero = True

    def accumulate_grad(self, g):
        """``.grad += g``. Right after zero_grad, ``g`` itself becomes ``.grad``: pass only
        arrays nothing else holds (the fresh results of a backward op)."""
        if getattr(g, "shape", None) != self.shape:
            raise ValueError(f"gradient of shape {getattr(g, 'shape', type(g).__name__)} for a parameter "
                             f"of shape {self.shape}")
        if self._grad_zero and type(g) is np.ndarray and g.dtype == self.dtype \
                and g.flags.c_contiguous and g.flags.writeable:
            self._grad, self._grad_zero = g, False
        else:
            grad = self.grad
            np.add(grad, g, out=grad)

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = arr.view(np.ndarray)
        return arr[()] if return_scalar else arr

    def __repr__(self):
        return f"Parameter({np.array2string(self.array, threshold=8)}, dtype={self.dtype})"


class Module:
    """Base class: registers parameters, buffers and submodules by attribute assignment.

    Subclasses implement ``forward(x)`` (caching what backward needs) and
    ``backward(grad_output)`` (returning the gradient w.r.t. ``x``).
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        if isinstance(value, Parameter):
            self._drop(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._drop(name)
            self._modules[name] = value
        elif name in self._buffers and isinstance(value, np.ndarray):
            self._buffers[name] = value  # e.g. ``self.count += 1`` keeps a buffer a buffer
        elif name in self._parameters or name in self._modules or name in self._buffers:
            self._drop(name)
        object.__setattr__(self, name, value)

    def _drop(self, name):
        for d in (self._parameters, self._buffers, self._modules):
            d.pop(name, None)

    def register_buffer(self, name: str, value: np.ndarray) -> None:
        """A state array that is saved in ``state_dict`` but not trained (e.g. running stats)."""
        self._drop(name)
        self._buffers[name] = value
        setattr(self, name, value)

    # -- running
    def __call__(self, x):
        if _root is not False:
            _background_compile(self, x)
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def _forward_with(self, before, x):
        """Sequential's hook for fused ops: this module's output for the input ``x`` of ``before``
        (the module run just before it), running both forwards as one op, or NotImplemented."""
        return NotImplemented

    def _backward_with(self, before, grad_output):
        """Sequential's hook for fused backward ops: the gradient w.r.t. the input of ``before``
        (the module run just before this one), doing both modules' backward at once, or
        NotImplemented where this pair has no fused op."""
        return NotImplemented

    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    # -- traversal
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix=""):
        seen = set()
        for mname, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mname}.{name}" if mname else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix=""):
        for mname, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                yield (f"{mname}.{name}" if mname else name), b

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- state
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers by dotted name, as plain arrays sharing the module's memory."""
        sd = OrderedDict((n, p.array) for n, p in self.named_parameters())
        sd.update(self.named_buffers())
        return sd

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays into the parameters and buffers in place (dtype cast, shapes must match)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        for name, dst in own.items():
            if name not in state_dict:
                continue
            src = np.asarray(state_dict[name])
            if src.shape != dst.shape:
                raise ValueError(f"{name}: shape {src.shape} in state_dict, {dst.shape} in the model")
            dst[...] = src
        return missing, unexpected

    def to(self, dtype):
        """Cast every parameter and floating buffer to ``dtype`` (new arrays: build optimizers after)."""
        dtype = np.dtype(dtype)
        for m in self.modules():
            for name, p in list(m._parameters.items()):
                setattr(m, name, Parameter(p.array, dtype=dtype))
            for name, b in list(m._buffers.items()):
                if np.issubdtype(b.dtype, np.floating):
                    m.register_buffer(name, b.astype(dtype))
        return self

    # -- display
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"({n}): " + repr(m).replace("\n", "\n  ") for n, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n  " + "\n  ".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied in order; ``backward`` runs them in reverse."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential takes Modules, got {type(m).__name__} at position {i}")
            setattr(self, str(i), m)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):  # a pair with a fused op (conv -> max pool) runs as one
            fused = mods[i + 1]._forward_with(mods[i], x) if i + 1 < len(mods) else NotImplemented
            if fused is NotImplemented:
                x = mods[i](x)
                i += 1
            else:
                x = fused
                i += 2
        return x

    def backward(self, grad_output):
        mods = list(self._modules.values())
        i = len(mods) - 1
        while i >= 0:  # a pair with a fused backward (conv -> max pool) runs as one op
            fused = mods[i]._backward_with(mods[i - 1], grad_output) if i else NotImplemented
            if fused is NotImplemented:
                grad_output = mods[i].backward(grad_output)
                i -= 1
            else:
                grad_output = fused
                i -= 2
        return grad_output

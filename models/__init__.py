"""A thin PyTorch-like model layer on fastkern's kernels.

Parameters are NumPy arrays with a ``.grad`` beside them; there is no autograd
tape: each layer has an explicit ``backward``.

    model = models.LeNet5()
    crit = models.CrossEntropyLoss()
    opt = models.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = crit(model(x), y)
    model.backward(crit.backward())
    opt.step(); opt.zero_grad()
"""
from . import init  # noqa: F401
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
from .layers import (  # noqa: F401
    AvgPool2d, BatchNorm1d, BatchNorm2d, Conv1d, Conv2d, Dropout, Flatten, GlobalAvgPool2d,
    LeakyReLU, Linear, MaxPool2d, ReLU, Sigmoid, Tanh, reseed_dropout,
)
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss  # noqa: F401
from .memory import reuse_freed_memory  # noqa: F401
from .module import Module, Parameter, Sequential, manual_seed  # noqa: F401
from .optim import SGD, Adam, AdamW, CosineAnnealingLR, RMSprop, StepLR  # noqa: F401
from .zoo import MLP, LeNet5, LogisticRegression, SmallCNN  # noqa: F401

"""Ready-made models, each a Sequential (state_dict names "0.weight", "2.bias", ...).

Convolutions run with ``activation="relu"``: the bias add and the ReLU are one
fused pass over the conv output (``bias_relu``) instead of two, which is the
same math as torch's Conv2d + ReLU and, per parameter in order, the same
weights. ``seed`` makes the initialization reproducible (None: the global
generator).
"""
from __future__ import annotations

import numpy as np

from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from .module import Sequential, seeded


class LogisticRegression(Sequential):
    """Multinomial logistic regression: Flatten -> Linear(in_features, num_classes)."""

    def __init__(self, in_features, num_classes, dtype=np.float32, seed=0):
        with seeded(seed):
            super().__init__(Flatten(), Linear(in_features, num_classes, dtype=dtype))


class MLP(Sequential):
    """Flatten -> [Linear -> ReLU (-> Dropout)] per hidden width -> Linear(num_classes)."""

    def __init__(self, in_features, hidden=(128,), num_classes=10, dropout=0.0, dtype=np.float32,
                 seed=0):
        layers, width = [Flatten()], in_features
        with seeded(seed):
            for h in hidden:
                layers += [Linear(width, h, dtype=dtype), ReLU(inplace=True)]
                if dropout:
                    layers.append(Dropout(dropout))
                width = h
            layers.append(Linear(width, num_classes, dtype=dtype))
            super().__init__(*layers)


class LeNet5(Sequential):
    """LeNet-5 for (N, 1, 28, 28): two 5x5 conv/ReLU/max-pool stages, then 120-84-10.

    ``input_grad=False`` makes ``backward`` skip the gradient w.r.t. the images
    (and return None): all that training needs.
    """

    def __init__(self, num_classes=10, dtype=np.float32, seed=0, input_grad=True):
        with seeded(seed):
            super().__init__(
                Conv2d(1, 6, 5, padding=2, activation="relu", dtype=dtype, input_grad=input_grad), MaxPool2d(2),
                Conv2d(6, 16, 5, activation="relu", dtype=dtype), MaxPool2d(2),
                Flatten(),
                Linear(400, 120, dtype=dtype), ReLU(inplace=True),
                Linear(120, 84, dtype=dtype), ReLU(inplace=True),
                Linear(84, num_classes, dtype=dtype),
            )


class SmallCNN(Sequential):
    """For (N, 3, 32, 32): conv32/conv64 (3x3, pad 1) with ReLU and max-pool, then 4096-256-10.

    ``input_grad`` as in :class:`LeNet5`.
    """

    def __init__(self, num_classes=10, dtype=np.float32, seed=0, input_grad=True):
        with seeded(seed):
            super().__init__(
                Conv2d(3, 32, 3, padding=1, activation="relu", dtype=dtype, input_grad=input_grad), MaxPool2d(2),
                Conv2d(32, 64, 3, padding=1, activation="relu", dtype=dtype), MaxPool2d(2),
                Flatten(),
                Linear(4096, 256, dtype=dtype), ReLU(inplace=True),
                Linear(256, num_classes, dtype=dtype),
            )


ZOO = {"logreg": LogisticRegression, "mlp": MLP, "lenet5": LeNet5, "smallcnn": SmallCNN}

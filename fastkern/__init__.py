"""fastkern: Numba-JIT, parallel CPU kernels for deep learning.

NumPy arrays in, NumPy arrays out. Every op has its backward beside it.
"""
from .threads import get_num_threads, set_num_threads, threads  # noqa: F401
from .gemm import matmul  # noqa: F401

# --- conv (conv.py) ---
from .conv import (  # noqa: F401,E402
    conv1d, conv1d_backward, conv2d, conv2d_backward, conv3d, conv3d_backward,
)
from .im2col import col2im, im2col  # noqa: F401,E402

# --- pooling (pool.py) ---
from .pool import (  # noqa: F401,E402
    avg_pool1d, avg_pool1d_backward, avg_pool2d, avg_pool2d_backward, global_avg_pool2d,
    global_avg_pool2d_backward, max_pool1d, max_pool1d_backward, max_pool2d, max_pool2d_backward,
)

# --- activations (activations.py) ---
from .activations import (  # noqa: F401,E402
    bias_relu, bias_relu_backward, leaky_relu, leaky_relu_backward, log_softmax,
    log_softmax_backward, relu, relu_backward, sigmoid, sigmoid_backward, softmax,
    softmax_backward, tanh, tanh_backward,
)

# --- losses (losses.py) ---
from .losses import (  # noqa: F401,E402
    binary_cross_entropy_with_logits, mse_loss, nll_loss, softmax_cross_entropy,
)

# --- linear, batch norm, dropout, regularization (linear.py, norm.py, regularization.py) ---
from .linear import linear, linear_backward  # noqa: F401,E402
from .norm import batch_norm, batch_norm_backward, dropout, dropout_backward  # noqa: F401,E402
from .regularization import (  # noqa: F401,E402
    add_regularization_grad, elastic_net_grad, elastic_net_penalty, l1_grad, l1_penalty, l2_grad, l2_penalty,
)

# --- optimizer update kernels (optim.py) ---
from .optim import (  # noqa: F401,E402
    adam_update, adam_update_foreach, rmsprop_update, rmsprop_update_foreach, sgd_update, sgd_update_foreach,
)

from ._warmup import warmup  # noqa: F401,E402
import sys as _sys  # noqa: E402

from ._codegen import plain_calls_in, thin_launches  # noqa: E402

for _module in [m for name, m in _sys.modules.items() if name.startswith(__name__ + ".")]:
    thin_launches(_module)  # every kernel module is imported by now, and nothing has compiled yet
    plain_calls_in(_module)
del _module, _sys

# While the kernels compile in the background, the ops a training step needs run on NumPy.
from . import background, reference  # noqa: E402

background._lock_cache_saves()

for _name in reference.__all__:
    globals()[_name] = background.tiered(_name, globals()[_name], getattr(reference, _name))
del _name

__version__ = "0.1.0"

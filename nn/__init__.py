"""Hand-written layers, loss, optimizers and gradient checks on numpy or cupy (`xp`).

No autograd: every forward has a backward derived by hand (see each module's
docstring for the formulas), and tests/ checks each against finite differences.
"""
from .backend import get_xp, get_device_module, to_device, to_host, synchronize  # noqa: F401
from .layers import (dense_forward, dense_backward, conv_forward, conv_backward,  # noqa: F401
                     leaky_relu_forward, leaky_relu_backward, tanh_forward, tanh_backward,
                     sigmoid, sigmoid_forward, sigmoid_backward, flatten_forward,
                     flatten_backward, conv_output_size)
from .loss import sigmoid_cross_entropy  # noqa: F401
from .optim import Optimizer, sgd, sgd_momentum, rmsprop, adam  # noqa: F401
from .gradcheck import rel_error, numerical_gradient, check_gradient  # noqa: F401
